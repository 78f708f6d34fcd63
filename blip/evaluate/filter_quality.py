"""How well the CapFilt filter finds the noisy web pairs, measured against the generator's labels.

The paper could not measure this (no ground truth on web data); our generated world knows which
web captions it corrupted. This is the only evaluation code that reads those labels, and it
reads them only through ``blip.data.noise_labels`` (see ``blip/data/labels.py``), at the edge
(:func:`evaluate_filter`); :func:`filter_metrics` takes them as an argument.

Convention: "noisy" is the positive class and "dropped" the positive prediction. The filter
keeps a web pair when ITM p(match) >= threshold (0.5, §3.3), so it drops p < threshold.
Undefined ratios (0/0, e.g. precision when nothing is dropped) are NaN.

The baseline is an ITC-cosine filter dropping the same *number* of pairs as the ITM filter (its
lowest cosines), so the two are compared at equal cost in data; its ROC-AUC needs no threshold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np

from ..capfilt.config import DEFAULT_THRESHOLD

_log = logging.getLogger("blip.evaluate")



def roc_auc(scores, positive) -> float:
    """ROC-AUC of ``scores`` (higher = more likely positive) against boolean ``positive``.

    Rank-based (Mann-Whitney U) with tied scores given their average rank, so a tie between a
    positive and a negative counts one half. NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first element
    avg_rank = first + (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _drop_metrics(dropped: np.ndarray, kinds: np.ndarray) -> dict:
    """Confusion-matrix metrics of a drop decision; ``kinds``: noise kind per pair, "" = clean."""
    noisy = kinds != ""
    tp = int((dropped & noisy).sum())
    fp = int((dropped & ~noisy).sum())
    fn = int((~dropped & noisy).sum())
    tn = int((~dropped & ~noisy).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    per_kind = {}
    for kind in sorted(set(kinds[noisy].tolist()), key=_kind_order):
        sel = kinds == kind
        per_kind[kind] = {"count": int(sel.sum()), "recall": _ratio(int((dropped & sel).sum()), int(sel.sum()))}
    return {
        "n_dropped": tp + fp,
        "drop_rate": _ratio(tp + fp, len(kinds)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(kinds)),
        "clean_drop_rate": _ratio(fp, fp + tn),
        "kept_noise_rate": _ratio(fn, fn + tn),
        "per_kind": per_kind,
    }


def _kind_order(kind: str) -> tuple[int, str]:
    from ..data.noise import NOISE_KINDS

    return (NOISE_KINDS.index(kind), "") if kind in NOISE_KINDS else (len(NOISE_KINDS), kind)


def filter_metrics(
    itm: Mapping[str, float],
    labels: Mapping[str, str | None],
    itc: Mapping[str, float] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """Filter metrics of ITM p(match) ``itm`` (key → p) against ``labels`` (key → noise kind,
    ``None`` = clean), plus the ITC-cosine baseline when ``itc`` (key → cosine) is given.

    Scored are the keys in both ``itm`` (finite values) and ``labels``; ``n_missing`` counts
    labelled pairs without a score, ``n_unknown`` scores without a label (both logged).

    Returns ``threshold, n, n_noisy, noise_rate, n_missing, n_unknown``, the drop metrics
    ``n_dropped, drop_rate, precision, recall, f1, accuracy, clean_drop_rate, kept_noise_rate,
    per_kind: {kind: {count, recall, auc}}`` (``auc``: ROC-AUC of 1 - p, that kind against the
    clean pairs: how well the filter separates it at any threshold), ``auc`` (ROC-AUC of 1 - p against noisy), and
    ``itc_baseline`` (``auc``, ``threshold``: its cosine cut, and the same drop metrics at the
    ITM filter's ``n_dropped``, per-kind AUCs of the cosine included) or, without ``itc``, ``skipped: {"itc_baseline": reason}``.
    """
    keys = sorted(k for k, v in itm.items() if k in labels and v is not None and np.isfinite(v))
    n_missing = sum(1 for k in labels if k not in itm or itm[k] is None or not np.isfinite(itm[k]))
    n_unknown = sum(1 for k in itm if k not in labels)
    if not keys:
        raise ValueError(f"none of the {len(itm)} scored keys has a noise label among {len(labels)} labelled "
                         "samples: are the scores and the labels from the same web split?")
    if n_missing:
        _log.warning("filter quality: %d labelled web pairs have no ITM score; they are left out", n_missing)
    if n_unknown:
        _log.warning("filter quality: %d scored keys have no noise label; they are left out", n_unknown)
    kinds = np.array([labels[k] or "" for k in keys], dtype=object)
    p = np.array([itm[k] for k in keys], dtype=np.float64)
    noisy = kinds != ""
    dropped = p < threshold
    out = {
        "threshold": float(threshold),
        "n": len(keys),
        "n_noisy": int(noisy.sum()),
        "noise_rate": _ratio(int(noisy.sum()), len(keys)),
        "n_missing": n_missing,
        "n_unknown": n_unknown,
        **_drop_metrics(dropped, kinds),
        "auc": roc_auc(1.0 - p, noisy),
    }
    _kind_aucs(out["per_kind"], 1.0 - p, kinds)
    if itc is None:
        out["skipped"] = {"itc_baseline": "no ITC cosines given"}
        return out
    if any(k not in itc for k in keys):
        missing = [k for k in keys if k not in itc]
        raise ValueError(f"{len(missing)} ITM-scored pairs have no ITC cosine, e.g. {missing[:5]}")
    cos = np.array([itc[k] for k in keys], dtype=np.float64)
    n_drop = int(dropped.sum())
    order = np.argsort(cos, kind="stable")  # lowest cosine first; ties in key order
    base_dropped = np.zeros(len(keys), dtype=bool)
    base_dropped[order[:n_drop]] = True
    out["itc_baseline"] = {
        "auc": roc_auc(-cos, noisy),
        "threshold": float(cos[order[n_drop - 1]]) if n_drop else float("nan"),  # highest dropped cosine
        **_drop_metrics(base_dropped, kinds),
    }
    _kind_aucs(out["itc_baseline"]["per_kind"], -cos, kinds)
    return out


def _kind_aucs(per_kind: dict, noise_score: np.ndarray, kinds: np.ndarray) -> None:
    """Add to each kind of ``per_kind`` the ROC-AUC of ``noise_score`` (higher = noisier), that kind
    against the clean pairs: how well the score separates it at any threshold."""
    clean = kinds == ""
    for kind, m in per_kind.items():
        sel = (kinds == kind) | clean
        m["auc"] = roc_auc(noise_score[sel], ~clean[sel]) if clean.any() else float("nan")


def load_filter_scores(source, key_column: str = "key", itm_column: str = "itm_web", itc_column: str | None = "itc_web"):
    """``(itm, itc)`` dicts key → value from the filter worker's output.

    ``source``: a mapping key → p(match) (``itc`` is then ``None``); a pyarrow Table or pandas
    DataFrame; or a parquet file or a folder of per-shard ``*.parquet`` files (the CapFilt
    filter worker's layout). Null scores become NaN (counted as missing by
    :func:`filter_metrics`). ``itc`` is ``None`` when ``itc_column`` is absent or ``None``.
    """
    if isinstance(source, Mapping):
        return {str(k): (float(v) if v is not None else float("nan")) for k, v in source.items()}, None
    if isinstance(source, (str, os.PathLike)):
        source = _read_parquet(os.fspath(source), [key_column, itm_column] + ([itc_column] if itc_column else []))
    columns = list(source.column_names) if hasattr(source, "column_names") else list(source.columns)
    for col in (key_column, itm_column):
        if col not in columns:
            raise KeyError(f"filter scores have no column {col!r}; columns: {columns}")

    def col(name):
        c = source[name]
        return c.to_pylist() if hasattr(c, "to_pylist") else list(c)

    keys = [str(k) for k in col(key_column)]
    dupes = len(keys) - len(set(keys))
    if dupes:
        seen: set[str] = set()
        first = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"filter scores hold {dupes} repeated keys (e.g. {first!r}); keys must be unique within "
                         "one web split: pass one split's score files")

    def floats(name):
        return [float("nan") if v is None else float(v) for v in col(name)]

    itm = dict(zip(keys, floats(itm_column)))
    itc = dict(zip(keys, floats(itc_column))) if itc_column and itc_column in columns else None
    return itm, itc


def _read_parquet(path: str, columns: list[str]):
    import pyarrow as pa

    from ..capfilt.records import read_score_tables

    return pa.concat_tables(read_score_tables(path, columns=columns).values(), promote_options="default")


def evaluate_filter(
    scores,
    web_shards,
    threshold: float = DEFAULT_THRESHOLD,
    itm_column: str = "itm_web",
    itc_column: str | None = "itc_web",
) -> dict:
    """:func:`filter_metrics` of the filter's web-text scores (anything :func:`load_filter_scores`
    accepts, e.g. the filter stage's output folder) against the noise labels of ``web_shards``."""
    from ..data.labels import noise_labels

    itm, itc = load_filter_scores(scores, itm_column=itm_column, itc_column=itc_column)
    return filter_metrics(itm, noise_labels(web_shards), itc=itc, threshold=threshold)
