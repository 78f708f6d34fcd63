"""Side-by-side markdown table of metric dicts (baseline vs CapFilt, ...), for the report stage."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

from ..track import flatten as _flatten

NOTES_KEY = "skipped"  # {metric: reason}, as the evaluators return it: rendered as notes, not rows


def flatten(metrics: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dicts to dotted keys: ``{"per_kind": {"spam": {"recall": 1}}}`` -> ``per_kind.spam.recall``.
    ``skipped`` entries (also a split's, ``test/skipped``) are left out (see :func:`metrics_table`)."""
    return _flatten({k: v for k, v in metrics.items() if not _is_notes(k)}, ".", prefix, skip=(NOTES_KEY,))


def _is_notes(key: str) -> bool:
    return key == NOTES_KEY or key.endswith("/" + NOTES_KEY)


def _notes(metrics: Mapping) -> dict[str, str]:
    """``{metric: reason}`` of every ``skipped`` entry, a split's named with its prefix
    (``{"test/skipped": {"SPICE": why}}`` -> ``{"test/SPICE": why}``)."""
    out: dict[str, str] = {}
    for k, v in metrics.items():
        if _is_notes(k) and isinstance(v, Mapping):
            out.update({f"{k[: -len(NOTES_KEY)]}{metric}": str(why) for metric, why in v.items()})
    return out


def _cell(v, digits: int) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, numbers.Integral):  # numpy integers too
        return str(int(v))
    if isinstance(v, numbers.Real):
        return "nan" if math.isnan(v) else f"{float(v):.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _number(v) -> int | float | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def metrics_table(
    columns: Mapping[str, Mapping],
    rows: Sequence[str] | None = None,
    digits: int = 2,
    delta: bool = False,
) -> str:
    """Markdown table with one column per metric dict, e.g. ``{"baseline": m0, "CapFilt": m1}``.

    ``rows``: dotted metric names to show, in order (default: every key of every dict, in
    first-seen order; nested dicts flattened). Missing values show as "–", floats with
    ``digits`` decimals. ``delta``: with exactly two columns, add ``Δ`` = second − first.
    Each dict's ``skipped`` entries ({metric: reason}) become notes under the table, naming
    the columns they apply to, so a skipped metric is never just a blank.
    """
    if not columns:
        raise ValueError("no metric dicts to tabulate")
    if delta and len(columns) != 2:
        raise ValueError(f"delta needs exactly two columns, got {len(columns)}")
    names = list(columns)
    flat = {n: flatten(m) for n, m in columns.items()}
    if rows is None:
        rows = list(dict.fromkeys(k for n in names for k in flat[n]))
    header = ["metric", *names] + (["Δ"] if delta else [])
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for r in rows:
        vals = [flat[n].get(r) for n in names]
        cells = [r, *(_cell(v, digits) for v in vals)]
        if delta:
            a, b = (_number(v) for v in vals)
            cells.append(_cell(b - a, digits) if a is not None and b is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    notes: dict[tuple[str, str], list[str]] = {}
    for n in names:
        for metric, why in _notes(columns[n]).items():  # one line each, never a table row of reasons
            notes.setdefault((metric, why), []).append(n)
    if notes:
        lines.append("")
        for (metric, why), cols in notes.items():
            lines.append(f"- {metric} skipped ({', '.join(cols)}): {why}")
    return "\n".join(lines) + "\n"


HEADLINE = ("test/r_mean", "test/txt_r1", "test/img_r1", "zeroshot/r_mean", "zeroshot/txt_r1", "zeroshot/img_r1",
            "test/CIDEr", "test/Bleu_4")


def headline(runs: Mapping[str, Mapping], base: str = "baseline", new: str = "capfilt") -> str:
    """The answer first: one sentence on the difference in test retrieval, then the headline
    metrics of ``base`` and ``new`` side by side with Δ = new − base."""
    if base not in runs or new not in runs:
        return metrics_table(runs, rows=[r for r in HEADLINE if any(r in m for m in runs.values())])
    rows = [r for r in HEADLINE if r in runs[base] or r in runs[new]]
    a, b = _number(runs[base].get("test/r_mean")), _number(runs[new].get("test/r_mean"))
    lead = ""
    if a is not None and b is not None:
        verdict = "better" if b > a else "worse" if b < a else "no different"
        lead = (f"The model pre-trained on the bootstrapped data is **{verdict}** than the noisy-data baseline on "
                f"test retrieval: r_mean {b:.1f} vs {a:.1f} (Δ {b - a:+.1f}; one seed, one run).\n\n")
    bare = {name: {k: v for k, v in runs[name].items() if k != NOTES_KEY} for name in (base, new)}
    return lead + metrics_table(bare, rows=rows, delta=True)  # notes about skipped metrics go to the details


INTERVAL_KEYS = ("difference", "metric", "files")  # the non-split entries of the report's ``intervals``


def intervals_text(iv: Mapping) -> str:
    """One line per split of the report's ``intervals`` (``stages.evaluate._intervals``): the
    difference with its paired bootstrap interval over the test images, and the smallest effect the
    protocol can detect there (the interval's half-width, ``intervals.detectable_effect``)."""
    lines = []
    for split, r in iv.items():
        if split in INTERVAL_KEYS:
            continue
        lines.append(f"- **{split}**: {iv.get('difference', 'a − b')} {iv.get('metric', 'r_mean')} = "
                     f"**{r['diff']:+.2f}** [{r['lo']:+.2f}, {r['hi']:+.2f}] ({100 * r['level']:.0f}% paired "
                     f"bootstrap over {r['n_images']} {split} images, {r['n_boot']} draws); smallest detectable "
                     f"effect ±{r['detectable_effect']:.2f}")
    return ("Paired bootstrap intervals (both models on the same resampled images; one seed: training "
            "seed-to-seed spread is not in them):\n\n" + "\n".join(lines) + "\n")


def filter_by_kind(fq: Mapping) -> str:
    """The filter against the hidden noise labels, per noise kind: what ITM dropped, and the ITC
    cosine filter (DataComp's CLIP score) dropping as many texts."""
    itc = fq.get("itc_baseline") or {}
    kinds = fq.get("per_kind") or {}
    lines = [f"ROC-AUC against the hidden labels: ITM **{_cell(fq.get('auc'), 3)}**, ITC cosine "
             f"{_cell(itc.get('auc'), 3)}. At p(match) < {_cell(fq.get('threshold'), 2)} the filter drops "
             f"{_cell(fq.get('n_dropped'), 0)} of {_cell(fq.get('n'), 0)} web texts: precision "
             f"{_cell(fq.get('precision'), 2)}, recall {_cell(fq.get('recall'), 2)}, clean texts dropped "
             f"{_cell(fq.get('clean_drop_rate'), 2)}.", "",
             "| noise kind | texts | dropped by ITM | dropped by ITC (same count) | ROC-AUC against the clean texts: ITM / ITC |",
             "|---|---:|---:|---:|---:|"]
    for kind, v in kinds.items():
        other = (itc.get("per_kind") or {}).get(kind, {})
        lines.append(f"| {kind} | {v.get('count')} | {_cell(v.get('recall'), 2)} | {_cell(other.get('recall'), 2)} "
                     f"| {_cell(v.get('auc'), 3)} / {_cell(other.get('auc'), 3)} |")
    lines.append(f"| clean | {_cell((fq.get('n') or 0) - (fq.get('n_noisy') or 0), 0)} | "
                 f"{_cell(fq.get('clean_drop_rate'), 2)} | {_cell(itc.get('clean_drop_rate'), 2)} | |")
    return "\n".join(lines) + "\n"


def dataset_table(ds: Mapping, true_noise_ratio: float | None = None) -> str:
    """The bootstrapped dataset: per source, input = kept + dropped, and why texts were dropped.
    ``true_noise_ratio``: the caption checker's share of synthetic captions false of their scene,
    shown beside Table 2's "noise ratio" (the share the filter rejects, all the paper could see)."""
    units = ds.get("units") or {}
    lines = ["| source | unit | input | kept | dropped | dropped by |", "|---|---|---:|---:|---:|---|"]
    for source, v in (ds.get("sources") or {}).items():
        why = ", ".join(f"{k} {n}" for k, n in (v.get("dropped_by") or {}).items()) or "–"
        lines.append(f"| {source} | {units.get(source, '')} | {v.get('input')} | {v.get('kept')} | {v.get('dropped')} "
                     f"| {why} |")
    extra = [] if not ds.get("web_decided_by") else [  # score: oracle (capfilt/assemble.py)
        f"**oracle: an evaluation instrument, not a filter.** Web texts decided by {ds['web_decided_by']}; "
        f"synthetic texts by {ds.get('synthetic_decided_by', 'the filter')}. It bounds what a perfect web filter "
        "could buy in this world."]
    true = "" if true_noise_ratio is None else f"; true noise ratio (caption checker): {_cell(true_noise_ratio, 3)}"
    extra += [f"noise ratio of the synthetic captions (Table 2: the share the filter rejects): "
              f"{_cell(ds.get('noise_ratio'), 3)}{true}",
              f"web texts the filter rejects: {_cell(ds.get('web_drop_ratio'), 3)}"
              + (" (not dropped: the filter is off in this run)" if not ds.get("use_filter", True) else
                 " (not applied to web texts: the oracle's labels decide them)" if ds.get("web_decided_by") else ""),
              f"pairs for re-pre-training: {_cell((ds.get('texts') or {}).get('total'), 0)} texts on "
              f"{_cell(ds.get('images'), 0)} images in {_cell(ds.get('shards'), 0)} shards"]
    return "\n".join(lines) + "\n\n" + "".join(f"- {e}\n" for e in extra)


def synthetic_check_table(sc: Mapping) -> str:
    """The synthetic captions checked against their scenes (``caption_check.check_synthetic``):
    the true noise ratio beside the fraction the filter rejects (the paper's Table 2 could only
    report the latter), the filter's ROC-AUC on them, and per label how many the threshold keeps.
    ``{"absent": why}`` renders as that one sentence."""
    if "absent" in sc:
        return f"Not measured: {sc['absent']}\n"
    itc = f", ITC cosine {_cell(sc['auc_itc'], 3)}" if "auc_itc" in sc else ""
    lines = [f"True synthetic noise ratio **{_cell(sc.get('true_noise_ratio'), 3)}** (captions false of their "
             f"scene) vs filter-rejected ratio {_cell(sc.get('filter_rejected_ratio'), 3)} (p(match) < "
             f"{_cell(sc.get('threshold'), 2)}); false among the kept: {_cell(sc.get('kept_noise_ratio'), 3)}.",
             # one sentence a line (one paragraph in markdown): the stage prints the report into logs
             f"ROC-AUC of the filter, true against false captions: ITM **{_cell(sc.get('auc_itm'), 3)}**{itc}.",
             f"{_cell(sc.get('n'), 0)} captions of {_cell(sc.get('n_images'), 0)} images; right objects "
             f"(count, colour, shape) {_cell(sc.get('objects_right'), 3)}.", "",
             "| label | captions | fraction | kept by the filter |", "|---|---:|---:|---:|"]
    for label, v in (sc.get("per_label") or {}).items():
        if v.get("count"):
            lines.append(f"| {label} | {v['count']} | {_cell(v.get('fraction'), 3)} | "
                         f"{_cell(v.get('kept_fraction'), 2)} |")
    return "\n".join(lines) + "\n"
