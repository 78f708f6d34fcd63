"""A picture of CapFilt: web images with their web text and their synthetic caption, each in green
when the filter kept it and in red when it dropped it, with the filter's p(match).

The hidden noise kind of the web text is written in the image's corner (evaluation only: read
through ``blip.data.noise_labels``, like the filter-quality metrics); "clean" when the web text is
the image's own description. Samples are picked per kind (clean first, then the noise kinds in the
generator's order), in key order, so every kind shows up and the same scores give the same picture.
"""

from __future__ import annotations

import io
import textwrap

from PIL import Image, ImageDraw

from ..capfilt.config import DEFAULT_THRESHOLD
from ..capfilt.records import read_score_tables
from ..data.contact_sheet import GREEN, INK, PAPER, RED, _font
from ..data.labels import noise_labels
from ..data.noise import NOISE_KINDS
from ..data.shards import resolve_shards
from ..data.tario import RawSample, iter_shard_samples

GREY = (120, 120, 120)


def _score_rows(scores_dir) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for table in read_score_tables(scores_dir, columns=["key", "status", "web_text", "syn_text", "itm_web",
                                                        "itm_syn"]).values():
        for r in table.to_pylist():
            rows[r["key"]] = r
    if not rows:
        raise FileNotFoundError(f"no score tables in {scores_dir}: run the filter stage first")
    return rows


def pick(rows: dict[str, dict], labels: dict[str, str | None], per_kind: int) -> list[str]:
    """Up to ``per_kind`` scored keys of each kind (clean, then the noise kinds), in key order."""
    out = []
    for kind in (None, *NOISE_KINDS):
        keys = sorted(k for k, r in rows.items() if r.get("status") == "ok" and r.get("itm_web") is not None
                      and labels.get(k, "?") == kind)
        out += keys[:per_kind]
    return out


def pick_unlabelled(rows: dict[str, dict], threshold: float, n: int) -> list[str]:
    """Your own data has no hidden labels: up to ``n`` scored keys, kept and dropped web texts
    alternating (key order within each), so the sheet shows both sides of the threshold."""
    scored = sorted(k for k, r in rows.items() if r.get("status") == "ok" and r.get("itm_web") is not None)
    kept = [k for k in scored if rows[k]["itm_web"] >= threshold]
    dropped = [k for k in scored if rows[k]["itm_web"] < threshold]
    out = [k for pair in zip(kept, dropped) for k in pair][:n]
    rest = kept[len(out) // 2:] + dropped[len(out) // 2:]
    return out + rest[:n - len(out)]


def _images(web_shards, keys: set[str]) -> dict[str, Image.Image]:
    found: dict[str, Image.Image] = {}
    for url in resolve_shards(web_shards):
        for s in iter_shard_samples(url):
            if isinstance(s, RawSample) and s.key in keys and s.error is None:
                data = next((s.fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in s.fields), None)
                if data is not None:
                    found[s.key] = Image.open(io.BytesIO(data)).convert("RGB")
        if len(found) == len(keys):
            break
    return found


def capfilt_gallery(web_shards, scores_dir, out_path: str, threshold: float = DEFAULT_THRESHOLD,
                    per_kind: int = 3, cols: int = 7, cell: int = 176) -> dict:
    """Write the gallery PNG; returns ``{"samples": n, "kinds": {kind: n}}``."""
    rows = _score_rows(scores_dir)
    labels = noise_labels(web_shards)
    labelled = any(v is not None for v in labels.values())  # the generator's world; your data has none
    keys = pick(rows, labels, per_kind) if labelled else pick_unlabelled(rows, threshold, 3 * cols)
    if not keys:
        raise ValueError(f"no scored web samples in {scores_dir} / {web_shards!r}")
    images = _images(web_shards, set(keys))
    font, small = _font(12), _font(11)
    wrap = max(12, cell // 7)
    blocks = []
    for k in keys:
        r = rows[k]
        lines = []
        for tag, text, p in (("web", r.get("web_text"), r.get("itm_web")), ("syn", r.get("syn_text"), r.get("itm_syn"))):
            if text is None:
                lines.append((f"{tag}: (none)", GREY))
                continue
            colour = GREY if p is None else GREEN if p >= threshold else RED
            head = f"{tag} p={p:.2f}: " if p is not None else f"{tag}: "
            for j, line in enumerate(textwrap.wrap(head + text, wrap, max_lines=3, placeholder="...")):
                lines.append((line, colour))
        blocks.append(lines)
    line_h = 14
    text_h = line_h * max(len(b) for b in blocks) + 8
    n_rows = (len(keys) + cols - 1) // cols
    legend_h = 22
    sheet = Image.new("RGB", (cols * cell, legend_h + n_rows * (cell + text_h)), PAPER)
    d = ImageDraw.Draw(sheet)
    corner = "corner: the hidden noise kind of the web text (evaluation only)" if labelled else "no hidden labels"
    d.text((6, 4), f"CapFilt: green = kept, red = dropped by the filter (ITM p(match) < {threshold:.2f}); {corner}",
           fill=INK, font=font)
    kinds: dict[str, int] = {}
    for i, (k, lines) in enumerate(zip(keys, blocks, strict=True)):
        x, y = (i % cols) * cell, legend_h + (i // cols) * (cell + text_h)
        if k in images:
            sheet.paste(images[k].resize((cell - 8, cell - 8), Image.Resampling.BICUBIC), (x + 4, y + 4))
        kind = (labels.get(k) or "clean") if labelled else "unlabelled"
        kinds[kind] = kinds.get(kind, 0) + 1
        if labelled:
            box = d.textbbox((x + 6, y + 6), kind, font=small)
            d.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=PAPER)
            d.text((x + 6, y + 6), kind, fill=INK if kind == "clean" else RED, font=small)
        for j, (line, colour) in enumerate(lines):
            d.text((x + 4, y + cell + 2 + j * line_h), line, fill=colour, font=font)
    sheet.save(out_path, format="PNG")
    return {"samples": len(keys), "kinds": kinds}
