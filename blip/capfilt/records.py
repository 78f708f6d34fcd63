"""Per-shard results and their records: what a shard worker returns, how it is committed, when a
committed result is still valid, and how the score tables are read back.

A *result* is a parquet table with one row per input sample (columns ``key`` and ``status``
at least; ``status`` is ``"ok"`` or why the sample was not used), named after the input shard
(``00003.tar`` -> ``00003.parquet``). Its parquet footer holds a *record* (JSON under the
schema-metadata key ``blip.capfilt``) saying what produced it::

    stage, config_hash, inputs (fingerprints), rows, expected_rows, status counts,
    outputs {relative path: bytes} (side files, e.g. assembled tars), shard_error, info

Idempotency rule: a result is valid, and its shard skipped, iff the file's footer reads, the
record's ``stage``, ``config_hash`` and ``inputs`` equal this run's, the table has ``rows`` rows,
``rows == expected_rows`` == the input's sample count from its metadata (``count_shards``) —
or the input was damaged (``shard_error``; the unreadable tail has no keys to give rows to) —
and every side output exists with its recorded size. Anything else is recomputed.

Atomicity: the table is written through ``blip.atomic.atomic_path`` (``<name>.tmp-<pid>-<thread>``
in the same folder, renamed over ``<name>``), so a reader sees the old result, the new one or none
— never half. Side outputs are written (atomically) before the table, so the table is the commit
mark: a crash between the two leaves side files that the rerun rewrites. Temporaries a killed run
left beside a result are removed when that result is next committed (``remove_stale_tmp``).

Every executor (``shardwork``'s thread and process pools, ``ray_executor``) commits through
:func:`commit`, so their tables are the same bytes.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path, remove_stale_tmp
from ..data.shards import shard_file_name

RECORD_KEY = b"blip.capfilt"
OK = "ok"  # the status of a usable sample; anything else names why it was not used


@dataclass(frozen=True)
class ShardTask:
    """One unit of work. ``inputs``: fingerprints (str -> str) of everything besides the config
    that the result depends on (the input shard, an upstream table); ``params``: per-task data
    for the worker that is not a dependency in itself (e.g. output shard ids, also fingerprinted)."""

    url: str
    name: str  # result file name inside out_dir
    expected_rows: int
    inputs: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardResult:
    """What a worker returns for one shard. ``table`` has one row per sample read, in shard
    order; ``outputs``: side files already written (absolute paths); ``shard_error``: the input
    was damaged, so rows may be fewer than ``expected_rows``; ``info``: stage facts for the record."""

    table: pa.Table
    outputs: list[str] = field(default_factory=list)
    shard_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def read_record(path: str | os.PathLike) -> dict | None:
    """The record in a result's footer, with ``num_rows``; ``None`` if absent or unreadable."""
    try:
        md = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return None
    raw = (md.metadata or {}).get(RECORD_KEY)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    rec["num_rows"] = md.num_rows
    return rec


def write_table_atomic(path: str | os.PathLike, table: pa.Table, record: dict | None = None) -> None:
    """Write ``table``, with ``record`` in its footer, atomically (``blip.atomic.atomic_path``)."""
    if record is not None:
        meta = dict(table.schema.metadata or {})
        meta[RECORD_KEY] = json.dumps(record, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def is_valid(path: str | os.PathLike, task: ShardTask, stage: str, cfg_hash: str) -> dict | None:
    """The record if the result at ``path`` is valid for ``task`` (module docstring), else None."""
    if not os.path.exists(path):
        return None
    rec = read_record(path)
    if rec is None:
        return None
    if rec.get("stage") != stage or rec.get("config_hash") != cfg_hash or rec.get("inputs") != task.inputs:
        return None
    if rec["num_rows"] != rec.get("rows") or rec.get("expected_rows") != task.expected_rows:
        return None
    if rec["rows"] != task.expected_rows and not rec.get("shard_error"):
        return None
    folder = os.path.dirname(str(path))
    for rel, size in (rec.get("outputs") or {}).items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return None
    return rec


def commit(task: ShardTask, result: ShardResult, out_dir: str, stage: str, cfg_hash: str) -> dict:
    """Check ``result`` against ``task`` and write it, with its record, as ``out_dir/task.name``
    (clearing what a killed run left beside it first); returns the record (with ``num_rows``)."""
    table = result.table
    for col in ("key", "status"):
        if col not in table.column_names:
            raise ValueError(f"{stage} worker returned a table without a {col!r} column for {task.url}")
    rows = table.num_rows
    if rows != task.expected_rows and result.shard_error is None:
        raise ValueError(
            f"{task.url}: its metadata (_stats.json / sizes.json) says {task.expected_rows} samples but "
            f"{rows} were read; fix or delete the stale metadata (python -m blip.data inspect {task.url})")
    status = Counter(table.column("status").to_pylist())
    record = {
        "stage": stage,
        "config_hash": cfg_hash,
        "inputs": task.inputs,
        "input": shard_file_name(task.url),
        "rows": rows,
        "expected_rows": task.expected_rows,
        "status": dict(sorted(status.items())),
        "outputs": {os.path.relpath(p, out_dir): os.path.getsize(p) for p in result.outputs},
        "shard_error": result.shard_error,
        "info": result.info,
    }
    path = os.path.join(out_dir, task.name)
    remove_stale_tmp(path)
    write_table_atomic(path, table, record)
    record["num_rows"] = rows
    return record


def shard_failed(stage: str, task: ShardTask, exc: BaseException) -> RuntimeError:
    """The error a run raises when ``task`` failed (raise it ``from exc``)."""
    return RuntimeError(f"{stage}: shard {task.url} failed ({type(exc).__name__}: {exc}); finished shards are kept, "
                        "rerun to complete the rest")


# ---- score tables (the filter stage's results) ------------------------------------------------


def has_synthetic(path: str, table: pa.Table) -> bool:
    """Whether the filter scored synthetic captions for this shard (from its record; for a table
    without one, whether any synthetic text is present)."""
    rec = read_record(path)
    if rec is not None and "with_captions" in (rec.get("info") or {}):
        return bool(rec["info"]["with_captions"])
    return table.column("syn_text").null_count < table.num_rows


def read_scores(path: str, use_captioner: bool = False, columns: list[str] | None = None) -> pa.Table:
    """One shard's score table. ``use_captioner``: raise when its synthetic texts were never scored;
    ``columns``: keep only these, those the table has (older tables lack the ITC ones)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the filter stage on the same web shards first")
    read = None
    if columns is not None:  # read only what is asked (and what the synthetic check needs)
        have = set(pq.read_schema(path).names)
        read = [c for c in dict.fromkeys([*columns, *(["syn_text"] if use_captioner else [])]) if c in have]
    table = pq.read_table(path, columns=read)
    if use_captioner and not has_synthetic(path, table):
        raise ValueError(f"{path} has no synthetic-caption scores (the filter ran without captions_dir): rerun "
                         "the filter with the caption stage's output, or assemble without the captioner "
                         "(use_captioner: false)")
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    return table


def read_score_tables(source: str | os.PathLike, use_captioner: bool = False,
                      columns: list[str] | None = None) -> dict[str, pa.Table]:
    """The score tables of ``source`` — the filter stage's folder of per-shard ``*.parquet`` files,
    or one such file — as ``{"00003.parquet": table}`` in file order (:func:`read_scores` each)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.parquet")))
        if not files:
            raise FileNotFoundError(f"no *.parquet score tables in {source}; run the filter stage first")
    elif os.path.isfile(source):
        files = [source]
    else:
        raise FileNotFoundError(f"filter scores {source} not found; run the filter stage first")
    return {os.path.basename(f): read_scores(f, use_captioner, columns) for f in files}
