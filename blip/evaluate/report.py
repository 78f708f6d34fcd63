"""Side-by-side markdown table of metric dicts (baseline vs CapFilt, ...), for the report stage."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

from ..track import flatten as _flatten

NOTES_KEY = "skipped"  # {metric: reason}, as the evaluators return it: rendered as notes, not rows


def flatten(metrics: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dicts to dotted keys: ``{"per_kind": {"spam": {"recall": 1}}}`` -> ``per_kind.spam.recall``.
    ``skipped`` entries are left out (see :func:`metrics_table`)."""
    return _flatten(dict(metrics), ".", prefix, skip=(NOTES_KEY,))


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
        for metric, why in (columns[n].get(NOTES_KEY) or {}).items():
            notes.setdefault((metric, str(why)), []).append(n)
    if notes:
        lines.append("")
        for (metric, why), cols in notes.items():
            lines.append(f"- {metric} skipped ({', '.join(cols)}): {why}")
    return "\n".join(lines) + "\n"
