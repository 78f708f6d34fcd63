"""Keep/drop decisions from stored filter scores: cheap, so a new threshold never rescores.

A text passes the filter when its ITM p(match) >= ``threshold`` (0.5; §3.3, blip-facts §1.17):
the filter drops what its ITM head calls unmatched. Which texts the new dataset keeps depends on
the CapFilt parts in use (paper Table 1)::

    parts       use_filter  use_captioner   dataset
    none        False       False           human + all web
    filter      True        False           human + web that passes
    captioner   False       True            human + all web + all synthetic
    both        True        True            human + web that passes + synthetic that passes

Only usable samples (status "ok") are kept; a synthetic text exists only for those, and only
when the caption was not empty.
"""

from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq

from .config import DEFAULT_THRESHOLD
from .shardwork import read_record

DECISION_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()),
    ("web_pass", pa.bool_()), ("syn_pass", pa.bool_()),  # p >= threshold (null: no score)
    ("keep_web", pa.bool_()), ("keep_syn", pa.bool_()),
])


def has_synthetic(path: str, table: pa.Table) -> bool:
    """Whether the filter scored synthetic captions for this shard (from its record; for a table
    without one, whether any synthetic text is present)."""
    rec = read_record(path)
    if rec is not None and "with_captions" in (rec.get("info") or {}):
        return bool(rec["info"]["with_captions"])
    return table.column("syn_text").null_count < table.num_rows


def decide(scores: pa.Table, threshold: float = DEFAULT_THRESHOLD, use_filter: bool = True,
           use_captioner: bool = True) -> pa.Table:
    """Per-row decisions (``DECISION_SCHEMA``) for one shard's score table."""
    status = scores.column("status").to_pylist()
    web_text, syn_text = scores.column("web_text").to_pylist(), scores.column("syn_text").to_pylist()
    itm_web, itm_syn = scores.column("itm_web").to_pylist(), scores.column("itm_syn").to_pylist()
    web_pass = [None if p is None else p >= threshold for p in itm_web]
    syn_pass = [None if p is None else p >= threshold for p in itm_syn]
    keep_web, keep_syn = [], []
    for st, wt, syn, wp, sp in zip(status, web_text, syn_text, web_pass, syn_pass):
        ok = st == "ok"
        keep_web.append(ok and bool(wt) and (bool(wp) if use_filter else True))
        keep_syn.append(use_captioner and ok and bool(syn) and (bool(sp) if use_filter else True))
    return pa.table({"key": scores.column("key").to_pylist(), "status": status, "web_pass": web_pass,
                     "syn_pass": syn_pass, "keep_web": keep_web, "keep_syn": keep_syn}, schema=DECISION_SCHEMA)


def read_scores(path: str, use_captioner: bool) -> pa.Table:
    """One shard's score table; raises when synthetic texts are needed but were never scored."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the filter stage on the same web shards first")
    table = pq.read_table(path)
    if use_captioner and not has_synthetic(path, table):
        raise ValueError(f"{path} has no synthetic-caption scores (the filter ran without captions_dir): rerun "
                         "the filter with the caption stage's output, or assemble without the captioner "
                         "(use_captioner: false)")
    return table


def select(scores_dir, threshold: float = DEFAULT_THRESHOLD, use_filter: bool = True,
           use_captioner: bool = True) -> dict[str, pa.Table]:
    """Decisions for every score table in ``scores_dir``: ``{"00003.parquet": table}``, each
    table key-aligned with its scores (``DECISION_SCHEMA``). Reads only; nothing is rescored."""
    files = sorted(glob.glob(os.path.join(str(scores_dir), "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no *.parquet score tables in {scores_dir}; run the filter stage first")
    return {os.path.basename(f): decide(read_scores(f, use_captioner), threshold, use_filter, use_captioner)
            for f in files}
