"""The shard worker pattern, written once: per input shard, skip a valid result or compute one
and commit it atomically. The caption, filter and assemble stages are three uses of it.

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

Atomicity: the table goes to ``<name>.tmp-<pid>-<thread>`` in the same folder and is renamed over
``<name>`` (``os.replace``), so a reader sees the old result, the new one or none — never half.
Side outputs are written (atomically) before the table, so the table is the commit mark: a crash
between the two leaves side files that the rerun rewrites. A failed shard removes its temporary
file; temporaries left by a killed process are removed when a later run reaches that shard.

Fan-out: ``workers <= 1`` runs shards in order in this thread; otherwise a
``concurrent.futures`` pool: ``executor="thread"`` (default: the model is loaded once and shared,
torch releases the GIL in its kernels, and decoding one shard overlaps compute on another) or
``"process"`` (spawned processes, each loading its own model: for CPU-bound decoding or one
process per device) or ``"ray"`` (Ray actors on one host or a cluster, each loading its own model
on its own GPU; results come back to this process, which commits them: ``ray_executor.py``).
On the first failure, shards not yet started are cancelled, running ones
finish and commit, and the error is raised naming the shard.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_EXCEPTION,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.shards import SHARD_EXTENSIONS, shard_file_name
from .config import check_fan_out

_log = logging.getLogger("blip.capfilt")

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


Worker = Callable[[ShardTask], ShardResult]


# ---- result files -----------------------------------------------------------------------------


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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same folder, so the rename is atomic); rename it
    over ``path`` when the block succeeds, remove it when anything fails (an interrupt included)."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_table_atomic(path: str | os.PathLike, table: pa.Table, record: dict | None = None) -> None:
    """Write ``table``, with ``record`` in its footer, atomically (:func:`atomic_path`)."""
    if record is not None:
        meta = dict(table.schema.metadata or {})
        meta[RECORD_KEY] = json.dumps(record, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove ``<path>.tmp-*`` left by a killed run (only this result's, so a concurrent run
    on other shards of the same folder is not disturbed)."""
    for tmp in glob.glob(glob.escape(str(path)) + ".tmp-*"):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


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


# ---- running ----------------------------------------------------------------------------------


def _commit(task: ShardTask, result: ShardResult, out_dir: str, stage: str, cfg_hash: str) -> dict:
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
    write_table_atomic(os.path.join(out_dir, task.name), table, record)
    record["num_rows"] = rows
    return record


def _do(task: ShardTask, work: Worker, out_dir: str, stage: str, cfg_hash: str) -> dict:
    remove_stale_temporaries(os.path.join(out_dir, task.name))
    t = time.perf_counter()
    result = work(task)
    rec = _commit(task, result, out_dir, stage, cfg_hash)
    _log.info("%s: %s -> %s (%d rows, %.1f s)", stage, task.url, task.name, rec["rows"], time.perf_counter() - t)
    return rec


_PROCESS_WORKER: Worker | None = None  # one per spawned worker process (set by its initializer)


def _process_init(factory: Callable[[], Worker], threads: int) -> None:
    global _PROCESS_WORKER
    import torch

    torch.set_num_threads(threads)
    _PROCESS_WORKER = factory()


def _process_do(task: ShardTask, out_dir: str, stage: str, cfg_hash: str) -> dict:
    assert _PROCESS_WORKER is not None
    return _do(task, _PROCESS_WORKER, out_dir, stage, cfg_hash)


def check_unique_names(tasks: list[ShardTask]) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise ValueError(f"shards {seen[t.name]} and {t.url} would both write {t.name}: pass one shard set "
                             "per output folder (shard file names must be unique)")
        seen[t.name] = t.url


def run_shards(
    stage: str,
    tasks: list[ShardTask],
    out_dir: str | os.PathLike,
    worker_factory: Callable[[], Worker],
    cfg_hash: str,
    workers: int = 1,
    executor: str = "thread",
    tracker=None,
    progress: bool = False,
    ray=None,
    prepare: Callable[[ShardTask], ShardTask] | None = None,
) -> dict:
    """Bring every task's result in ``out_dir`` up to date; returns the summary::

        stage, out_dir, shards, done, skipped_existing, rows (all shards), rows_done (this run),
        status {status: rows} (all shards), shard_errors {result name: error}, seconds

    ``worker_factory()`` builds the per-shard function (loading models) once per thread pool or
    once per process; it must be picklable for ``executor="process"`` (a ``functools.partial``
    of a module-level class). It is not called when every shard is already valid.
    ``ray``: ``RayOptions`` for ``executor="ray"``. ``prepare(task)`` (Ray only): called here, in
    this process, just before a task is shipped to its worker, to attach what a worker on another
    host could not read from this host's disk (the filter's caption table).
    """
    check_fan_out(workers, executor)
    t0 = time.perf_counter()
    out = str(out_dir)
    os.makedirs(out, exist_ok=True)
    check_unique_names(tasks)
    records: dict[str, dict] = {}
    todo: list[ShardTask] = []
    for task in tasks:
        rec = is_valid(os.path.join(out, task.name), task, stage, cfg_hash)
        if rec is not None:
            records[task.name] = rec
        else:
            todo.append(task)
    if todo:
        _log.info("%s: %d of %d shards to compute into %s (%d already done)", stage, len(todo), len(tasks), out,
                  len(tasks) - len(todo))
    bar = _bar(len(todo), progress and bool(todo), stage)
    done_records: list[dict] = []

    def finished(rec: dict) -> None:
        done_records.append(rec)
        bar.update(1)
        if tracker is not None:
            tracker.log_metrics({f"{stage}/shards_done": len(done_records),
                                 f"{stage}/rows_done": sum(r["rows"] for r in done_records)}, step=len(done_records))

    try:
        if todo and executor == "ray":
            from .ray_executor import run_ray

            run_ray(stage, todo, out, worker_factory, cfg_hash, workers, ray, records, finished, prepare)
        elif todo and workers <= 1:
            work = worker_factory()
            for task in todo:
                try:
                    rec = _do(task, work, out, stage, cfg_hash)
                except Exception as e:
                    raise _failed(stage, task, e) from e
                records[task.name] = rec
                finished(rec)
        elif todo:
            _run_pool(stage, todo, out, worker_factory, cfg_hash, workers, executor, records, finished)
    finally:
        bar.close()

    status: Counter = Counter()
    for rec in records.values():
        status.update(rec.get("status") or {})
    summary = {
        "stage": stage,
        "out_dir": out,
        "shards": len(tasks),
        "done": len(done_records),
        "skipped_existing": len(tasks) - len(done_records),
        "rows": sum(r["rows"] for r in records.values()),
        "rows_done": sum(r["rows"] for r in done_records),
        "status": dict(sorted(status.items())),
        "shard_errors": {name: r["shard_error"] for name, r in sorted(records.items()) if r.get("shard_error")},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if tracker is not None:
        tracker.log_metrics({f"{stage}/{k}": summary[k] for k in ("shards", "done", "skipped_existing", "rows")})
    return summary


def _run_pool(stage, todo, out, worker_factory, cfg_hash, workers, executor, records, finished) -> None:
    if executor == "thread":
        work = worker_factory()  # one model shared by all threads
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"capfilt-{stage}")
        submit = lambda task: pool.submit(_do, task, work, out, stage, cfg_hash)
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_process_init, initargs=(worker_factory, threads))
        submit = lambda task: pool.submit(_process_do, task, out, stage, cfg_hash)
    futures: dict[Future, ShardTask] = {}
    error: tuple[ShardTask, BaseException] | None = None
    with pool:
        futures = {submit(task): task for task in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                task = futures[fut]
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is not None:
                    if error is None:
                        error = (task, exc)
                        for p in pending:
                            p.cancel()  # not started: left for the rerun; running ones finish and commit
                    continue
                rec = fut.result()
                records[task.name] = rec
                finished(rec)
    if error is not None:
        task, exc = error
        raise _failed(stage, task, exc) from exc


def _failed(stage: str, task: ShardTask, exc: BaseException) -> RuntimeError:
    return RuntimeError(f"{stage}: shard {task.url} failed ({type(exc).__name__}: {exc}); finished shards are kept, "
                        "rerun to complete the rest")


def _bar(total: int, enabled: bool, desc: str):
    from ..data.progress import progress_bar

    return progress_bar(total, enabled, desc, unit="shard")


def shard_tasks(urls: list[str], out_name: Callable[[str], str], fingerprints: Callable[[str], dict[str, str]]) -> list[ShardTask]:
    """Tasks for ``urls`` with their expected row counts from shard metadata (``count_shards``)."""
    from ..data.shards import count_shards

    counts = count_shards(urls)
    return [ShardTask(u, out_name(u), counts[u].samples, fingerprints(u)) for u in urls]


def result_name(url: str) -> str:
    """``.../00003.tar`` -> ``00003.parquet`` (also for ``.tar.gz``/``.tgz`` and shard URLs:
    ``pipe:curl -s https://host/00003.tar``)."""
    base = shard_file_name(url)
    for ext in SHARD_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)] + ".parquet"
    return base + ".parquet"
