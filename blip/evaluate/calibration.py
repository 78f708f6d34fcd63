"""A threshold you can defend: choose the filter's cut from a few hundred texts a person labelled.

BLIP keeps a text when ITM p(match) >= 0.5 (§3.3, issue #46); DataComp keeps the top 30% by
CLIP score. Neither says how clean the kept texts are on *your* data. Here a person marks a few
hundred texts ``good`` or ``bad`` (``labels.csv``: ``key,text,label``), each is joined to the
filter stage's score tables, and the cut is chosen for a stated precision (the fraction of kept
texts that are good) or for a stated kept fraction; either way the precision and recall on the
labels are reported with the cut, so the choice can be argued.

Convention: "good" is the positive class and "kept" (score >= threshold, as
``blip.capfilt.selection.decide`` keeps) the positive prediction. Curves are swept over the
distinct scores of the labelled texts, highest first, so recall rises along them.

* :func:`pr_curve`, :func:`roc_curve`, :func:`average_precision` — the metrics (numpy only);
  ROC-AUC is ``filter_quality.roc_auc`` (rank-based, ties one half).
* :func:`threshold_for_precision` — the LOWEST threshold whose precision on the labels is >= the
  target: the most recall at that precision.
* :func:`threshold_for_fraction` — the cut that keeps a fraction of ALL scored texts of the tables.
* :func:`read_labels`, :func:`join_labels` — the labelled file and its join with the scores
  (key and text: the web text gets the web score, the synthetic caption the synthetic one).
* :func:`calibrate` — all of it, as the dict written to ``calibration.json``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..capfilt.config import DEFAULT_THRESHOLD
from ..capfilt.records import read_score_tables
from ..data.text import PRETRAIN_MAX_WORDS, pre_caption
from .filter_quality import roc_auc

SCORES = ("itm", "itc")
SOURCES = ("web", "syn")
GOOD = {"good": True, "1": True, "match": True, "bad": False, "0": False, "nomatch": False}
LABEL_COLUMNS = ("key", "text", "label")
MAX_CURVE_POINTS = 200  # per curve in calibration.json; the chosen points are always kept
_Z95 = 1.959964  # normal quantile of a two-sided 95% interval


# ---- metrics ----------------------------------------------------------------------------------


def _sweep(scores, good) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(thresholds descending, true positives, false positives at each, n_good, n_bad): keeping
    ``score >= thresholds[i]`` keeps ``tp[i] + fp[i]`` texts, ``tp[i]`` of them good."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(good, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-d and of one length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each distinct score
    tp = np.cumsum(y)[last]
    fp = last + 1 - tp
    return s[last], tp, fp, int(y.sum()), int((~y).sum())


def _div(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, np.nan), where=b != 0)


def pr_curve(scores, good) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), thresholds descending (one per distinct score): keeping
    ``score >= thresholds[i]`` has ``precision[i]`` (good among kept) and ``recall[i]`` (kept
    among good; NaN without good texts)."""
    t, tp, fp, n_good, _ = _sweep(scores, good)
    return _div(tp, tp + fp), _div(tp, n_good), t


def roc_curve(scores, good) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds) starting at (0, 0) with threshold
    +inf, then one point per distinct score, descending. Its trapezoid area is ROC-AUC."""
    t, tp, fp, n_good, n_bad = _sweep(scores, good)
    return _div(np.r_[0, fp], n_bad), _div(np.r_[0, tp], n_good), np.r_[np.inf, t]


def average_precision(scores, good) -> float:
    """AP = sum over the thresholds of (R_i - R_{i-1}) * P_i (no interpolation; sklearn's
    ``average_precision_score``). NaN without good texts."""
    p, r, _ = pr_curve(scores, good)
    if np.isnan(r).any():
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, r]) * p))


def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95% by default); NaNs when ``n == 0``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def at_threshold(scores, good, threshold: float) -> dict:
    """Precision, recall, false positive rate of keeping ``score >= threshold`` on the labels,
    with the kept count and the 95% Wilson interval of the precision."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(good, dtype=bool)
    kept = s >= threshold
    tp, fp = int((kept & y).sum()), int((kept & ~y).sum())
    n_good, n_bad = int(y.sum()), int((~y).sum())
    lo, hi = wilson_interval(tp, tp + fp)
    return {"precision": float(_div(tp, tp + fp)), "precision_ci95": [lo, hi], "recall": float(_div(tp, n_good)),
            "fpr": float(_div(fp, n_bad)), "n_kept_labelled": tp + fp}


def threshold_for_precision(scores, good, target: float) -> float | None:
    """The lowest threshold (a labelled score) whose precision on the labels is >= ``target``:
    of the cuts that reach the target, the one with the most recall. None when none reaches it."""
    p, _, t = pr_curve(scores, good)
    ok = np.flatnonzero(p >= target)
    return float(t[ok[-1]]) if len(ok) else None


def threshold_for_fraction(population, fraction: float) -> float:
    """The cut keeping ``round(fraction * N)`` (at least 1) of the ``population`` scores, the
    highest first (DataComp's ``--fraction``); tied scores at the cut are all kept."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep fraction {fraction}: must be in (0, 1]")
    s = np.sort(np.asarray(population, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("no scored texts to take a fraction of")
    return float(s[max(1, round(fraction * len(s))) - 1])


# ---- labels and their join with the score tables ----------------------------------------------


@dataclass
class LabelRow:
    line: int  # line of the labels file (the header is line 1)
    key: str
    text: str
    good: bool


def parse_label(value: str) -> bool | None:
    """``good|1|match`` -> True, ``bad|0|nomatch`` -> False (any case, spaces ignored), else None."""
    return GOOD.get(value.strip().lower().replace(" ", "").replace("-", "").replace("_", ""))


def read_labels(path: str | os.PathLike) -> list[LabelRow]:
    """The rows of a ``key,text,label`` CSV (other columns are ignored); raises naming the line
    of a bad label or the missing columns."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path} not found (columns key,text,label; "
                                "python -m blip calibrate sample writes one for the generated world)")
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)} in the header {reader.fieldnames}; "
                             "the first line must name the columns key,text,label")
        for row in reader:
            good = parse_label(row["label"] or "")
            if good is None:
                raise ValueError(f"{path} line {reader.line_num}: label {row['label']!r} (key {row['key']!r}) is "
                                 "none of good/bad, 1/0, match/nomatch; fix that row")
            rows.append(LabelRow(reader.line_num, row["key"] or "", row["text"] or "", good))
    if not rows:
        raise ValueError(f"{path} has no labelled rows")
    return rows


@dataclass
class Joined:
    """The labelled texts that matched a scored text: per score the values (``scores[s][i]`` of
    ``rows[i]``), and which text each is (``source[i]``: ``web`` | ``syn``)."""

    rows: list[LabelRow] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    unmatched: list[tuple[LabelRow, str]] = field(default_factory=list)  # (row, why)

    def good(self) -> np.ndarray:
        return np.array([r.good for r in self.rows], dtype=bool)


def _index(tables: dict, keys: set[str]) -> dict[str, list[dict]]:
    """key -> its score-table rows (a key normally has one), for ``keys`` only."""
    out: dict[str, list[dict]] = {}
    wanted = pa.array(sorted(keys), type=pa.string())
    for table in tables.values():
        for row in table.filter(pc.is_in(table.column("key"), value_set=wanted)).to_pylist():
            out.setdefault(row["key"], []).append(row)
    return out


def _match(label: LabelRow, candidates: list[dict], scores: tuple[str, ...]) -> tuple[str | None, dict | None, str]:
    """(source, the table row, why not) of one label row among its key's table rows."""
    if not candidates:
        return None, None, "its key is in no score table (another split, or a shard the filter did not score?)"
    texts = {label.text, label.text.strip(), pre_caption(label.text, PRETRAIN_MAX_WORDS)}  # raw captions too
    seen = []
    for row in candidates:
        for source in SOURCES:
            text = row.get(f"{source}_text")
            if text is None:
                continue
            seen.append(f"{source}_text {text!r}")
            if text not in texts:
                continue
            if row.get("status") != "ok":
                return None, None, f"that sample was not scored (status {row.get('status')!r})"
            missing = [s for s in scores if row.get(f"{s}_{source}") is None]
            if missing:
                return None, None, f"its {source} text has no {'/'.join(missing)} score"
            return source, row, ""
    status = {row.get("status") for row in candidates} - {"ok"}
    if not seen and status:
        return None, None, f"that sample was not scored (status {sorted(status)[0]!r})"
    return None, None, "the text is neither of the key's scored texts (" + "; ".join(seen) + ")"


def join_labels(labels: list[LabelRow], tables: dict, scores: tuple[str, ...]) -> Joined:
    """Join each label row to its score-table row by key and text: equal to ``web_text`` (or to
    it once cleaned as the loader cleans captions) -> the web scores, equal to ``syn_text`` -> the
    synthetic ones (web first when both are equal: the same pair). Rows that match nothing go to
    ``unmatched`` with the reason."""
    index = _index(tables, {label.key for label in labels})
    out = Joined(scores={s: [] for s in scores})
    for label in labels:
        source, row, why = _match(label, index.get(label.key, []), scores)
        if source is None:
            out.unmatched.append((label, why))
            continue
        out.rows.append(label)
        out.source.append(source)
        for s in scores:
            out.scores[s].append(float(row[f"{s}_{source}"]))
    return out


def unmatched_error(path, joined: Joined, limit: int = 5) -> ValueError:
    """The error naming the label rows that matched no scored text, and what to do."""
    lines = [f"  line {r.line}: key {r.key!r}, text {r.text!r}: {why}" for r, why in joined.unmatched[:limit]]
    more = len(joined.unmatched) - limit
    if more > 0:
        lines.append(f"  ... and {more} more")
    return ValueError(
        f"{path}: {len(joined.unmatched)} of {len(joined.unmatched) + len(joined.rows)} labelled rows match no scored "
        "text:\n" + "\n".join(lines) + "\nEach row's key must be a sample of the score tables and its text that "
        "sample's web_text or syn_text (python -m blip calibrate sample writes such a file); fix those rows, or pass "
        "--allow-unmatched to skip them (they are counted in calibration.json)")


def population(tables: dict, score: str) -> dict[str, np.ndarray]:
    """Every scored text's ``score`` per source (usable samples, non-empty texts), over all tables."""
    out = {source: [] for source in SOURCES}
    for table in tables.values():
        ok = pc.equal(table.column("status"), "ok")
        for source in SOURCES:
            text, value = table.column(f"{source}_text"), table.column(f"{score}_{source}")
            usable = pc.and_(pc.and_(ok, pc.not_equal(text, "")), value.is_valid())
            out[source].append(pc.filter(value, pc.fill_null(usable, False)).to_numpy().astype(np.float64))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


# ---- the calibration --------------------------------------------------------------------------


def _subsample(n: int, keep: list[int], max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Indices of at most about ``max_points`` evenly spread points of an n-point curve, with
    both ends and ``keep``."""
    if n <= max_points:
        return np.arange(n)
    idx = np.unique(np.r_[np.linspace(0, n - 1, max_points).round().astype(int), [i for i in keep if 0 <= i < n]])
    return idx


def _finite(x):
    """JSON-safe: NaN and inf become None."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _point(s, y, pop: dict[str, np.ndarray], threshold: float) -> dict:
    everything = np.r_[pop["web"], pop["syn"]]
    return {"threshold": threshold, **at_threshold(s, y, threshold),
            "kept_fraction": float(_div((everything >= threshold).sum(), len(everything))),
            "kept_fraction_web": float(_div((pop["web"] >= threshold).sum(), len(pop["web"])))}


def calibrate_score(s: np.ndarray, y: np.ndarray, pop: dict[str, np.ndarray], score: str,
                    target_precision: float | None = None, keep_fraction: float | None = None) -> dict:
    """One score's entry of ``calibration.json`` (see :func:`calibrate`)."""
    p, r, t = pr_curve(s, y)
    fpr, tpr, roc_t = roc_curve(s, y)
    if keep_fraction is not None:
        threshold = threshold_for_fraction(np.r_[pop["web"], pop["syn"]], keep_fraction)
        chosen = {"rule": "keep_fraction", "target": keep_fraction, **_point(s, y, pop, threshold)}
    else:
        threshold = threshold_for_precision(s, y, target_precision)
        chosen = {"rule": "target_precision", "target": target_precision}
        if threshold is None:
            best = int(np.nanargmax(p))
            chosen |= {"threshold": None, "reason": f"no threshold reaches precision {target_precision} on the "
                       f"{len(s)} labelled texts (best {p[best]:.3f}, at {t[best]:.4g})"}
        else:
            chosen |= _point(s, y, pop, threshold)
    keep_pr = [int(np.flatnonzero(t == threshold)[0])] if threshold is not None and (t == threshold).any() else []
    pr_idx = _subsample(len(t), keep_pr)
    roc_idx = _subsample(len(roc_t), [i + 1 for i in keep_pr])
    out = {
        "n_labelled": int(len(s)), "n_good": int(y.sum()), "n_bad": int((~y).sum()),
        "n_scored": {"web": int(len(pop["web"])), "syn": int(len(pop["syn"]))},
        "roc_auc": roc_auc(s, y), "average_precision": average_precision(s, y),
        "chosen": chosen,
        "pr_curve": {"precision": p[pr_idx], "recall": r[pr_idx], "threshold": t[pr_idx]},
        "roc_curve": {"fpr": fpr[roc_idx], "tpr": tpr[roc_idx], "threshold": roc_t[roc_idx]},
    }
    if score == "itm":  # BLIP's rule, for reference (§3.3, issue #46)
        out["blip_default"] = _point(s, y, pop, DEFAULT_THRESHOLD)
    return _finite(out)


@dataclass
class Calibration:
    report: dict  # calibration.json
    labelled: dict[str, tuple[np.ndarray, np.ndarray]]  # score -> (labelled scores, good) for the figure


def calibrate(scores_dir, labels_path, target_precision: float | None = None, keep_fraction: float | None = None,
              score: str = "itm", allow_unmatched: bool = False) -> Calibration:
    """Calibrate the filter's cut on the labelled texts of ``labels_path`` against the score tables
    of ``scores_dir``. ``score``: ``itm`` (p(match)), ``itc`` (cosine) or ``both``. Exactly one
    rule: ``target_precision`` (default 0.9) or ``keep_fraction`` (of all scored texts).

    Returns the report, per score: ``roc_auc``, ``average_precision``, ``pr_curve`` and ``roc_curve``
    (subsampled), ``chosen`` (the rule, its threshold — None with a ``reason`` when the target is
    out of reach — precision with its 95% interval, recall and false positive rate on the labels,
    ``kept_fraction`` of all scored texts and of the web texts), and for ITM ``blip_default``
    (the same at 0.5). Label rows matching no scored text raise (:func:`unmatched_error`) unless
    ``allow_unmatched``, when they are skipped and counted."""
    if target_precision is not None and keep_fraction is not None:
        raise ValueError("give a target precision or a keep fraction, not both")
    if target_precision is None and keep_fraction is None:
        target_precision = 0.9
    if target_precision is not None and not 0 < target_precision <= 1:
        raise ValueError(f"target precision {target_precision}: must be in (0, 1]")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep fraction {keep_fraction}: must be in (0, 1]")
    if score not in (*SCORES, "both"):
        raise ValueError(f"score {score!r}: one of itm, itc, both")
    names = SCORES if score == "both" else (score,)
    tables = read_score_tables(scores_dir)
    for name, table in tables.items():
        absent = [c for s in names for c in (f"{s}_web", f"{s}_syn") if c not in table.column_names]
        if absent:
            raise ValueError(f"{os.path.join(os.fspath(scores_dir), name)} has no column {', '.join(absent)}: rerun "
                             "the filter stage, or calibrate another --score")
    labels = read_labels(labels_path)
    joined = join_labels(labels, tables, names)
    if joined.unmatched and (not allow_unmatched or not joined.rows):
        raise unmatched_error(labels_path, joined)
    y = joined.good()
    if y.all() or not y.any():
        raise ValueError(f"{labels_path}: all {len(y)} matched rows are labelled {'good' if y.all() else 'bad'}; a "
                         "threshold needs both good and bad examples (label a random sample of the texts)")
    report = {
        "scores_dir": os.fspath(scores_dir), "labels": os.fspath(labels_path), "n_tables": len(tables),
        "n_labels": len(labels), "n_matched": len(joined.rows), "n_unmatched": len(joined.unmatched),
        "unmatched_lines": [r.line for r, _ in joined.unmatched],
        "n_matched_web": joined.source.count("web"), "n_matched_syn": joined.source.count("syn"),
        "kept_when": "score >= threshold",
        "scores": {},
    }
    labelled = {}
    for s in names:
        values = np.asarray(joined.scores[s], dtype=np.float64)
        report["scores"][s] = calibrate_score(values, y, population(tables, s), s, target_precision, keep_fraction)
        labelled[s] = (values, y)
    return Calibration(report, labelled)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def summary(report: dict) -> str:
    """A few lines for a person: the sample, per score its AUC, the chosen cut and BLIP's 0.5."""
    first = next(iter(report["scores"].values()))
    lines = [f"{report['n_matched']} labelled texts ({first['n_good']} good, {first['n_bad']} bad; "
             f"{report['n_matched_web']} web, {report['n_matched_syn']} synthetic"
             + (f"; {report['n_unmatched']} unmatched rows skipped" if report["n_unmatched"] else "")
             + f") against {report['n_tables']} score tables "
             f"({first['n_scored']['web']} web + {first['n_scored']['syn']} synthetic scored texts)"]
    for name, m in report["scores"].items():
        c = m["chosen"]
        lines.append(f"{name}: ROC-AUC {_num(m['roc_auc'])}, average precision {_num(m['average_precision'])}")
        rule = (f"precision >= {c['target']}" if c["rule"] == "target_precision" else f"keep {_pct(c['target'])}")
        if c.get("threshold") is None:
            lines.append(f"  {rule}: {c['reason']}")
        else:
            lo, hi = c["precision_ci95"]
            lines.append(f"  {rule}: threshold {c['threshold']:.4f} -> precision {_num(c['precision'])} "
                         f"(95% CI {_num(lo, 2)}-{_num(hi, 2)}), recall {_num(c['recall'])} on the labels; keeps "
                         f"{_pct(c['kept_fraction'])} of all scored texts ({_pct(c['kept_fraction_web'])} of web)")
        if "blip_default" in m:
            d = m["blip_default"]
            lines.append(f"  BLIP's 0.5: precision {_num(d['precision'])}, recall {_num(d['recall'])}; keeps "
                         f"{_pct(d['kept_fraction'])} of all scored texts")
        if name == "itm" and c.get("threshold") is not None:
            lines.append(f"  to use it: assemble.threshold: {c['threshold']:.4f} in params.yaml")
    return "\n".join(lines)
