"""Raw tar sample -> clean ``Sample`` (RGB image, cleaned captions, ids), or a skip reason.

Decisions for bad input (each counted in ``LoaderStats``; one skip reason per sample, the first
failing check in this order):

| input                              | outcome                                              |
| ---------------------------------- | ---------------------------------------------------- |
| sample cut off by a damaged tar    | skip ``truncated_tar`` / ``corrupt_tar``             |
| no .jpg/.jpeg/.png/.webp           | skip ``missing_image``                               |
| .json not valid JSON (or too deep) | ignored, convert ``json_unreadable``                 |
| no .txt                            | caption from ``json["caption"]`` (convert            |
|                                    | ``caption_from_json``), else skip ``missing_caption``|
| caption bytes not UTF-8            | decode as cp1252, convert ``caption_not_utf8``       |
| caption longer than ``max_words``  | truncated by ``pre_caption``, convert                |
|                                    | ``caption_truncated``                                |
| caption empty after ``pre_caption``| skip ``empty_caption`` (multi-caption samples drop   |
|                                    | the empty ones, convert ``empty_caption_dropped``)   |
| image bytes not decodable          | skip ``undecodable_image``                           |
| more than ``max_image_pixels``     | skip ``image_too_large`` (decompression-bomb guard)  |
| shorter side < ``min_image_side``  | skip ``image_too_small`` (1-px spacers, tracking     |
|                                    | pixels: nothing to learn)                            |
| longer side > ``max_image_side``   | downscaled (JPEG draft decoding), convert            |
|                                    | ``image_downscaled``                                 |
| CMYK, RGBA, LA, L, P, I, ... mode  | converted to RGB (alpha composited on white, as a    |
|                                    | browser shows it), convert ``mode_<MODE>``           |

The ``.json`` is read through a whitelist (``captions``, ``caption``, ``image_id``): every other
field, in particular the evaluation-only ``noise`` label, never leaves this module.
"""

from __future__ import annotations

import io
import json
import zlib
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from .stats import LoaderStats
from .tario import RawSample
from .text import decode_caption, pre_caption, word_count

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DecodeConfig:
    max_words: int = 30
    min_image_side: int = 4
    max_image_side: int = 1024
    max_image_pixels: int = 89_478_485  # PIL's own decompression-bomb warning threshold


@dataclass
class Sample:
    """A usable sample: ``image`` is RGB; ``captions`` are ``pre_caption``-ed and non-empty."""

    key: str
    image: Image.Image
    captions: list[str]
    image_id: int
    url: str


_INT64 = range(-(2**63), 2**63)  # image ids travel as a torch.long tensor


def image_id_of(key: str, meta: dict) -> int:
    """``json["image_id"]`` if it is an int64, else the key's ASCII digits (img2dataset keys) if
    they fit an int64, else CRC32 of the key."""
    v = meta.get("image_id")
    if isinstance(v, int) and not isinstance(v, bool) and v in _INT64:
        return v
    base = key.rsplit("/", 1)[-1]
    # isascii: str.isdigit also accepts "²" and "①"; len: int() of 4300+ digits raises
    if base.isascii() and base.isdigit() and len(base) <= 19 and int(base) in _INT64:
        return int(base)
    return zlib.crc32(key.encode("utf-8"))


def _captions(raw: RawSample, meta: dict, cfg: DecodeConfig, conv: Counter) -> list[str] | str:
    """Cleaned captions, or the skip reason."""
    caps = meta.get("captions")
    texts: list[str]
    if isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps):
        texts = caps
    elif "txt" in raw.fields:
        text, utf8 = decode_caption(raw.fields["txt"])
        if not utf8:
            conv["caption_not_utf8"] += 1
        texts = [text]
    elif isinstance(meta.get("caption"), str):
        conv["caption_from_json"] += 1
        texts = [meta["caption"]]
    else:
        return "missing_caption"
    if any(word_count(t) > cfg.max_words for t in texts):
        conv["caption_truncated"] += 1
    cleaned = [c for c in (pre_caption(t, cfg.max_words) for t in texts) if c]
    if not cleaned:
        return "empty_caption"
    if len(cleaned) < len(texts):
        conv["empty_caption_dropped"] += 1
    return cleaned


def _to_rgb(img: Image.Image, conv: Counter) -> Image.Image:
    if img.mode == "RGB":
        return img
    conv[f"mode_{img.mode}"] += 1
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits before RGB, else everything clips to white
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def _image(data: bytes, cfg: DecodeConfig, conv: Counter) -> Image.Image | str:
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError:
        return "image_too_large"
    except Exception:  # PIL raises many types for garbage: UnidentifiedImageError, SyntaxError, ...
        return "undecodable_image"
    if w * h > cfg.max_image_pixels:
        return "image_too_large"
    if min(w, h) < cfg.min_image_side:
        return "image_too_small"
    try:
        if max(w, h) > cfg.max_image_side:
            scale = cfg.max_image_side / max(w, h)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            img.draft("RGB", target)  # JPEG: decode at 1/2, 1/4, 1/8 scale directly (cheap)
            img = img.resize(target, Image.Resampling.BICUBIC) if img.size != target else img
            conv["image_downscaled"] += 1
        img.load()
        return _to_rgb(img, conv)
    except Exception:  # truncated or corrupt pixel data surfaces only on load
        return "undecodable_image"


def decode_sample(raw: RawSample, cfg: DecodeConfig, stats: LoaderStats) -> Sample | None:
    """Return a ``Sample`` (counted as used) or None (counted as skipped, by reason)."""
    if raw.error is not None:
        stats.skip(raw.error, raw)
        return None
    data = next((raw.fields[e] for e in IMAGE_EXTS if e in raw.fields), None)
    if data is None:
        stats.skip("missing_image", raw)
        return None
    conv: Counter = Counter()  # repairs, counted only if the sample ends up used
    meta: dict = {}
    if "json" in raw.fields:
        try:
            loaded = json.loads(raw.fields["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
            conv["json_unreadable"] += 1
    # whitelist: only these fields are read, so labels such as "noise" cannot leak
    meta = {k: meta[k] for k in ("captions", "caption", "image_id") if k in meta}
    captions = _captions(raw, meta, cfg, conv)
    if isinstance(captions, str):
        stats.skip(captions, raw)
        return None
    image = _image(data, cfg, conv)
    if isinstance(image, str):
        stats.skip(image, raw)
        return None
    stats.seen += 1
    stats.used += 1
    stats.converted.update(conv)
    return Sample(raw.key, image, captions, image_id_of(raw.key, meta), raw.url)
