"""Keep/drop decisions from stored filter scores: cheap, so a new rule or number never rescores.

Which texts the new dataset may keep depends on the CapFilt parts in use (paper Table 1)::

    parts       use_filter  use_captioner   dataset
    none        False       False           human + all web
    filter      True        False           human + web the rule keeps
    captioner   False       True            human + all web + all synthetic
    both        True        True            human + web and synthetic texts the rule keeps

Only usable samples (status "ok") are kept; a synthetic text exists only for those, and only
when the caption was not empty. An image's texts are its web text and its distinct synthetic
candidates (one without ``caption.candidates``; ``filter.distinct_candidates``).

The rule (``assemble.rule``; without the filter every text is kept and no rule applies):

* ``threshold`` (BLIP §3.3): every text whose ``score`` is >= ``threshold`` (ITM p(match) 0.5).
  ``score="itc"`` thresholds the ITC cosine instead (DataComp's CLIP-score filter) at the cut
  :func:`itc_cut` finds, which drops exactly as many texts as ITM drops at ``threshold`` — the two
  filters compared at equal kept count.
* ``top_k`` (BLIP-2, LAVIS #354): per image the ``top_k`` best of its texts by ``rank_score``,
  whatever their score (fewer when the image has fewer texts).
* ``fraction`` (DataComp): the best ``fraction`` of ALL texts of all shards by ``rank_score``:
  :func:`fraction_cut` sorts every text's score, ``n_keep = round(fraction * n_texts)``, and the
  cut is the ``n_keep``-th highest score; texts scoring >= the cut are kept (ties at the cut are
  all kept, so ``n_kept`` can exceed ``n_keep`` by the tied texts; both are in ``stats.json``).
* ``replace`` (Nguyen et al. 2023): one text per image — its web text when that passes the
  threshold rule, else its best candidate by ``rank_score`` among those that pass (none when
  none does). A rejected web text is never kept.

Why a text is not kept, per text: ``filter`` (below the threshold rule's pass mark, or the
fraction cut), ``rank`` (outranked: ``top_k``, or a passing candidate ``replace`` did not choose).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from .config import DEFAULT_THRESHOLD, RULES
from .records import read_score_tables

FILTERED, RANK, KEPT = "filter", "rank", "kept"

DECISION_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()),
    ("web_pass", pa.bool_()), ("syn_pass", pa.bool_()),  # score >= the threshold rule's pass mark (null: no score)
    ("keep_web", pa.bool_()), ("keep_syn", pa.bool_()),  # keep_syn: any candidate kept
    ("web_drop", pa.string()),  # why the web text is not kept (null when kept or absent)
    ("cand_pass", pa.list_(pa.bool_())), ("cand_keep", pa.list_(pa.bool_())), ("cand_drop", pa.list_(pa.string())),
])


@dataclass(frozen=True)
class Rule:
    """A selection rule and its numbers (``AssembleConfig.rule_spec()``). ``cut``: the pass mark on
    ``score`` (the threshold rule's, ``replace``'s test, and what ``web_pass``/``syn_pass`` and the
    noise ratio report under every rule; the ITC cut for ``score: itc``); ``rank_score``: what
    ``top_k``, ``fraction`` and ``replace``'s choice rank by; ``fraction_cut``: the fraction rule's
    cut on ``rank_score`` (:func:`fraction_cut`)."""

    name: str = "threshold"
    cut: float = DEFAULT_THRESHOLD
    score: str = "itm"
    rank_score: str = "itc"
    top_k: int = 2
    fraction_cut: float | None = None

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"assemble.rule={self.name!r}: use one of {RULES}")
        if self.name == "fraction" and self.fraction_cut is None:
            raise ValueError("the fraction rule needs its cut over all shards (selection.fraction_cut) first")


def image_texts(row: dict) -> tuple[dict | None, list[dict]]:
    """(web text, distinct candidates) of one score-table row, each ``{"text", "itm", "itm_logit",
    "itc"}``; the web text None when absent, the candidates empty when there are none."""
    web = None
    if row.get("web_text"):
        web = {"text": row["web_text"], "itm": row.get("itm_web"), "itm_logit": row.get("itm_logit_web"),
               "itc": row.get("itc_web")}
    if row.get("syn_candidates") is not None:
        cands = [{"text": t, "itm": p, "itm_logit": lg, "itc": c} for t, p, lg, c in
                 zip(row["syn_candidates"], row["itm_cand"], row["itm_logit_cand"], row["itc_cand"])]
    elif row.get("syn_text"):
        cands = [{"text": row["syn_text"], "itm": row.get("itm_syn"), "itm_logit": row.get("itm_logit_syn"),
                  "itc": row.get("itc_syn")}]
    else:
        cands = []
    return web, cands


def _passes(t: dict, score: str, cut: float) -> bool | None:
    return None if t.get(score) is None else t[score] >= cut


def _choose(rule: Rule, web: dict | None, cands: list[dict], web_pass, cand_pass) -> tuple[bool, list[bool], str | None, list]:
    """(keep web, keep each candidate, why the web text goes, why each candidate goes) under ``rule``."""
    if rule.name in ("threshold", "fraction"):
        if rule.name == "fraction":
            web_ok = web is not None and bool(_passes(web, rule.rank_score, rule.fraction_cut))
            keep = [bool(_passes(c, rule.rank_score, rule.fraction_cut)) for c in cands]
        else:
            web_ok, keep = web is not None and bool(web_pass), [bool(p) for p in cand_pass]
        return web_ok, keep, FILTERED if web is not None and not web_ok else None, [None if k else FILTERED for k in keep]
    if rule.name == "top_k":
        texts = ([(-1, web)] if web is not None else []) + list(enumerate(cands))
        chosen = {j for j, _ in sorted(texts, key=lambda t: -_rank_value(t[1], rule.rank_score))[:rule.top_k]}
        keep = [j in chosen for j in range(len(cands))]
        web_ok = web is not None and -1 in chosen
        return web_ok, keep, RANK if web is not None and not web_ok else None, [None if k else RANK for k in keep]
    web_ok = web is not None and bool(web_pass)  # replace
    best = None
    if not web_ok:
        passing = [j for j, p in enumerate(cand_pass) if p]
        best = max(passing, key=lambda j: _rank_value(cands[j], rule.rank_score), default=None)
    keep = [j == best for j in range(len(cands))]
    return (web_ok, keep, FILTERED if web is not None and not web_ok else None,
            [None if k else (RANK if p else FILTERED) for k, p in zip(keep, cand_pass)])


def _decide_row(row: dict, rule: Rule, use_filter: bool, use_captioner: bool) -> dict:
    web, cands = image_texts(row)
    ok = row["status"] == "ok"
    if not (ok and use_captioner):
        cands = []
    if not ok:
        web = None
    web_pass = None if web is None else _passes(web, rule.score, rule.cut)
    cand_pass = [_passes(c, rule.score, rule.cut) for c in cands]
    if use_filter:
        keep_web, keep, web_drop, drop = _choose(rule, web, cands, web_pass, cand_pass)
    else:
        keep_web, keep, web_drop, drop = web is not None, [True] * len(cands), None, [None] * len(cands)
    return {"key": row["key"], "status": row["status"], "web_pass": web_pass,
            "syn_pass": cand_pass[0] if cand_pass else None, "keep_web": keep_web, "keep_syn": any(keep),
            "web_drop": web_drop, "cand_pass": cand_pass, "cand_keep": keep, "cand_drop": drop}


def _rank_value(t: dict, score: str) -> float:
    v = t.get(score)
    return -math.inf if v is None else v


def decide(scores: pa.Table, threshold: float = DEFAULT_THRESHOLD, use_filter: bool = True,
           use_captioner: bool = True, score: str = "itm", rule: Rule | None = None) -> pa.Table:
    """Per-row decisions (``DECISION_SCHEMA``) for one shard's score table. Without ``rule``:
    BLIP's, every text whose ``score`` column (``itm``: p(match); ``itc``: cosine) is >= ``threshold``."""
    rule = rule or Rule("threshold", threshold, score)
    rows = [_decide_row(r, rule, use_filter, use_captioner) for r in scores.to_pylist()]
    return pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)


def _usable(table: pa.Table, score: str, use_captioner: bool) -> list[float]:
    """The ``score`` values of the texts a filter decides on (usable samples, non-empty texts)."""
    out = []
    for row in table.to_pylist():
        if row["status"] != "ok":
            continue
        web, cands = image_texts(row)
        texts = ([web] if web else []) + (cands if use_captioner else [])
        out += [t[score] for t in texts if t[score] is not None]
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


def fraction_cut(tables: Iterable[pa.Table], fraction: float, score: str = "itc", use_captioner: bool = True) -> dict:
    """The cut keeping the best ``fraction`` of all texts of all ``tables`` by ``score``: the
    ``n_keep``-th highest score, ``n_keep = round(fraction * n_texts)`` (+inf when ``n_keep`` is 0).
    Returns ``cut``, ``fraction``, ``score``, ``n_texts``, ``n_keep`` and ``n_at_or_above`` (texts
    the cut keeps: ``n_keep`` plus any ties)."""
    values = []
    for t in tables:
        values += _usable(t, score, use_captioner)
    values.sort(reverse=True)
    n_keep = math.floor(fraction * len(values) + 0.5)
    cut = values[n_keep - 1] if n_keep > 0 else float("inf")
    return {"cut": cut, "fraction": fraction, "score": score, "n_texts": len(values), "n_keep": n_keep,
            "n_at_or_above": sum(1 for v in values if v >= cut)}


def select(scores_dir, threshold: float = DEFAULT_THRESHOLD, use_filter: bool = True,
           use_captioner: bool = True, score: str = "itm", rule: Rule | None = None) -> dict[str, pa.Table]:
    """Decisions for every score table in ``scores_dir``: ``{"00003.parquet": table}``, each
    table key-aligned with its scores (``DECISION_SCHEMA``). Reads only; nothing is rescored.
    Without ``rule``: BLIP's threshold on ``score`` (``itc``: at the ITM filter's kept count,
    :func:`itc_cut`). With a ``rule`` whose ``cut`` is to be found (``fraction``, or ``itc``),
    pass it with that cut already computed (``AssembleConfig`` and ``assemble`` do)."""
    tables = read_score_tables(scores_dir, use_captioner)
    if rule is None:
        if score == "itc":
            threshold = itc_cut(tables.values(), threshold, use_captioner)["cut"]
        rule = Rule("threshold", threshold, score)
    return {name: decide(t, use_filter=use_filter, use_captioner=use_captioner, rule=rule) for name, t in tables.items()}
