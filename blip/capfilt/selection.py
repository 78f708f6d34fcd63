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

``score="itc"`` filters by the ITC cosine instead (DataComp's CLIP-score filter): a text passes
when its cosine >= the cut :func:`itc_cut` finds, which drops exactly as many texts as the ITM
filter drops at ``threshold`` — the two filters compared at equal kept count.
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
           use_captioner: bool = True, score: str = "itm") -> pa.Table:
    """Per-row decisions (``DECISION_SCHEMA``) for one shard's score table: a text passes when its
    ``score`` column (``itm``: p(match); ``itc``: cosine) is >= ``threshold``."""
    status = scores.column("status").to_pylist()
    web_text, syn_text = scores.column("web_text").to_pylist(), scores.column("syn_text").to_pylist()
    s_web, s_syn = scores.column(f"{score}_web").to_pylist(), scores.column(f"{score}_syn").to_pylist()
    web_pass = [None if p is None else p >= threshold for p in s_web]
    syn_pass = [None if p is None else p >= threshold for p in s_syn]
    keep_web, keep_syn = [], []
    for st, wt, syn, wp, sp in zip(status, web_text, syn_text, web_pass, syn_pass):
        ok = st == "ok"
        keep_web.append(ok and bool(wt) and (bool(wp) if use_filter else True))
        keep_syn.append(use_captioner and ok and bool(syn) and (bool(sp) if use_filter else True))
    return pa.table({"key": scores.column("key").to_pylist(), "status": status, "web_pass": web_pass,
                     "syn_pass": syn_pass, "keep_web": keep_web, "keep_syn": keep_syn}, schema=DECISION_SCHEMA)


def _usable(table: pa.Table, score: str, use_captioner: bool) -> list[float]:
    """The ``score`` values of the texts a filter decides on (usable samples, non-empty texts)."""
    out = []
    sources = ("web", "syn") if use_captioner else ("web",)
    for row in table.select(["status", "web_text", "syn_text", *(f"{score}_{s}" for s in sources)]).to_pylist():
        if row["status"] != "ok":
            continue
        out += [row[f"{score}_{s}"] for s in sources if row[f"{s}_text"] and row[f"{score}_{s}"] is not None]
    return out


def itc_cut(tables, threshold: float = DEFAULT_THRESHOLD, use_captioner: bool = True) -> dict:
    """The ITC cosine cut that drops as many texts as ITM p(match) < ``threshold`` drops, over all
    score ``tables`` (every shard: the cut is global). Returns ``cut`` (midway between the highest
    dropped and the lowest kept cosine; -inf when nothing is dropped, +inf when everything is),
    ``n_texts`` and ``n_drop``."""
    itm, itc = [], []
    for t in tables:
        itm += _usable(t, "itm", use_captioner)
        itc += _usable(t, "itc", use_captioner)
    if len(itm) != len(itc):
        raise ValueError(f"{len(itm)} texts have an ITM score but {len(itc)} an ITC cosine: rerun the filter stage")
    n_drop = sum(1 for p in itm if p < threshold)
    order = sorted(itc)
    if n_drop == 0:
        cut = float("-inf")
    elif n_drop == len(order):
        cut = float("inf")
    else:
        cut = (order[n_drop - 1] + order[n_drop]) / 2
    return {"cut": cut, "n_texts": len(itc), "n_drop": n_drop}


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
           use_captioner: bool = True, score: str = "itm") -> dict[str, pa.Table]:
    """Decisions for every score table in ``scores_dir``: ``{"00003.parquet": table}``, each
    table key-aligned with its scores (``DECISION_SCHEMA``). Reads only; nothing is rescored.
    ``score="itc"``: the ITC filter at the ITM filter's kept count (:func:`itc_cut`)."""
    files = sorted(glob.glob(os.path.join(str(scores_dir), "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no *.parquet score tables in {scores_dir}; run the filter stage first")
    tables = {os.path.basename(f): read_scores(f, use_captioner) for f in files}
    if score == "itc":
        threshold = itc_cut(tables.values(), threshold, use_captioner)["cut"]
    return {name: decide(t, threshold, use_filter, use_captioner, score) for name, t in tables.items()}
