"""A PNG grid of samples with their captions, so a person can see what a shard set holds.

Noisy web pairs get a red frame and their noise kind (read through ``labels.noise_labels``, the
evaluation-only reader); clean ones a thin green frame. Multi-caption samples show up to
``max_captions`` captions.
"""

from __future__ import annotations

import io
import json
import textwrap

from PIL import Image, ImageDraw, ImageFont

from .labels import noise_labels
from .shards import resolve_shards
from .tario import RawSample, iter_shard_samples
from .text import decode_caption

RED, GREEN, INK, PAPER = (210, 30, 30), (40, 150, 60), (20, 20, 20), (250, 250, 250)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _first_samples(shards, n: int) -> list[tuple[str, Image.Image | None, list[str]]]:
    out = []
    for url in resolve_shards(shards):
        for s in iter_shard_samples(url):
            if not isinstance(s, RawSample) or s.error:
                continue
            img = None
            data = next((s.fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in s.fields), None)
            if data is not None:
                try:
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                except Exception:
                    img = None  # drawn as an empty cell: a broken image is worth seeing too
            caps: list[str] = []
            if "json" in s.fields:
                try:
                    meta = json.loads(s.fields["json"])
                    if isinstance(meta.get("captions"), list):
                        caps = [str(c) for c in meta["captions"]]
                except ValueError:
                    pass
            if not caps and "txt" in s.fields:
                caps = [decode_caption(s.fields["txt"])[0]]
            out.append((s.key, img, caps))
            if len(out) == n:
                return out
    return out


def contact_sheet(shards, out_path: str, n: int = 48, cols: int = 8, cell: int = 160, max_captions: int = 3, mark_noise: bool = True) -> dict:
    """Write a PNG of the first ``n`` samples of ``shards``; returns {"samples", "noisy"} counts.

    ``cell``: pixel width of each tile (image scaled to ``cell`` x ``cell``, captions below).
    """
    samples = _first_samples(shards, n)
    if not samples:
        raise ValueError(f"no readable samples in {shards!r}")
    labels = noise_labels(shards) if mark_noise else {}
    font = _font(12)
    wrap = max(10, cell // 7)  # ~7 px per character at size 12
    texts = []
    for key, _, caps in samples:
        kind = labels.get(key)
        lines = [key] + ([f"NOISE: {kind}"] if kind else [])
        for c in caps[:max_captions]:
            lines += textwrap.wrap(c, wrap, max_lines=4, placeholder="...") or [""]
        texts.append(lines)
    line_h = 14
    text_h = line_h * max(len(t) for t in texts) + 6
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), PAPER)
    d = ImageDraw.Draw(sheet)
    noisy = 0
    for i, ((key, img, _), lines) in enumerate(zip(samples, texts, strict=True)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        if img is not None:
            sheet.paste(img.resize((cell - 8, cell - 8), Image.Resampling.BICUBIC), (x + 4, y + 4))
        kind = labels.get(key)
        if key in labels:
            colour, width = (RED, 4) if kind else (GREEN, 2)
            d.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=colour, width=width)
        noisy += bool(kind)
        for j, line in enumerate(lines):
            d.text((x + 4, y + cell + 1 + j * line_h), line, fill=RED if kind else INK, font=font)
    sheet.save(out_path, format="PNG")
    return {"samples": len(samples), "noisy": noisy}
