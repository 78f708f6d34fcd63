"""Real data into the same layout as the generated world.

- ``import_coco_karpathy``: COCO images + Karpathy's ``dataset_coco.json`` -> ``human/``
  (train + restval, as BLIP trains), ``val/``, ``test/`` shards + ``annotations/{val,test}_gt.json``.
- ``import_flickr_karpathy``: Flickr30k images + ``dataset_flickr30k.json`` -> ``human/``, ``val/``,
  ``test/`` (or, with ``as_zeroshot``, only the test split as ``zeroshot/``: the paper's zero-shot
  transfer setting).
- An img2dataset output folder needs no import: point the loader (or ``inspect_shards``) at it.

Karpathy JSON: ``{"images": [{"filepath"?, "filename", "split", "cocoid"?, "imgid",
"sentences": [{"raw", "tokens"}, ...]}, ...]}``. Image bytes are copied unchanged when they are
JPEG and no ``max_side`` is asked for, else re-encoded as JPEG (quality 95).
Images that are missing, unreadable or have no caption are skipped and counted by reason.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter

from PIL import Image

from . import layout
from .coco import build_gt, write_gt
from .progress import progress_bar
from .shards import (
    MAX_SHARD_SIZE,
    count_shards,
    dumps,
    make_key,
    resolve_shards,
    sample_members,
    write_shard,
    write_sizes,
)

COCO_SPLITS = {"train": "human", "restval": "human", "val": "val", "test": "test"}
FLICKR_SPLITS = {"train": "human", "val": "val", "test": "test"}
GT_SPLITS = ("val", "test", "zeroshot")


def _read_image(path: str, max_side: int | None) -> tuple[bytes, int, int, int, int] | str:
    """(jpeg bytes, width, height, original width, original height) or a skip reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "missing_file"
    try:
        img = Image.open(io.BytesIO(data))
        ow, oh = img.size
        fmt = img.format
        if fmt == "JPEG" and (max_side is None or max(ow, oh) <= max_side) and img.mode in ("RGB", "L"):
            img.verify()  # catches truncated files without decoding every pixel
            return data, ow, oh, ow, oh
        img = img.convert("RGB")
        if max_side is not None and max(ow, oh) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), img.width, img.height, ow, oh
    except Exception:
        return "undecodable_image"


def _captions(entry: dict) -> list[str]:
    caps = []
    for s in entry.get("sentences", []):
        raw = s.get("raw") if isinstance(s.get("raw"), str) else " ".join(s.get("tokens", []))
        raw = raw.strip()
        if raw:
            caps.append(raw)
    return caps


def import_karpathy(
    karpathy_json: str,
    image_root: str,
    out_dir: str,
    split_map: dict[str, str],
    image_id_key: str | None,
    shard_size: int = 1000,
    max_side: int | None = None,
    progress: bool = True,
    source: str = "karpathy",
) -> dict:
    """Shards + GT from a Karpathy split file; returns the summary written to ``manifest.json``.

    ``split_map``: Karpathy split -> output split (unlisted splits are ignored).
    ``image_id_key``: entry field holding the image id (``cocoid``); None: the file name's digits
    (Flickr ``1000092795.jpg``), else ``imgid``.
    """
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size={shard_size}: must be in 1..{MAX_SHARD_SIZE}")
    with open(karpathy_json, encoding="utf-8") as f:
        images = json.load(f).get("images")
    if not isinstance(images, list):
        raise ValueError(f"{karpathy_json}: no 'images' list; expected Karpathy's dataset_*.json format")
    t0 = time.perf_counter()
    by_split: dict[str, list[dict]] = {}
    for e in images:
        out_split = split_map.get(e.get("split"))
        if out_split is not None:
            by_split.setdefault(out_split, []).append(e)
    skipped: Counter = Counter()
    summary: dict = {}
    bar = progress_bar(sum(len(v) for v in by_split.values()), progress, "import")
    for out_split, entries in by_split.items():
        writer = _SplitWriter(os.path.join(out_dir, out_split), shard_size)
        gt_images, gt_caps = [], {}
        for e in entries:
            bar.update(1)
            rel = os.path.join(e.get("filepath", ""), e["filename"])
            caps = _captions(e)
            if not caps:
                skipped["no_captions"] += 1
                continue
            got = _read_image(os.path.join(image_root, rel), max_side)
            if isinstance(got, str):
                skipped[got] += 1
                continue
            data, w, h, ow, oh = got
            image_id = _image_id(e, image_id_key)
            key, shard_name = writer.next_key()
            meta = {"key": key, "caption": caps[0], "captions": caps, "image_id": image_id, "url": rel,
                    "status": "success", "error_message": None, "width": w, "height": h,
                    "original_width": ow, "original_height": oh, "exif": None, "source": source}
            if out_split in GT_SPLITS:
                gt_images.append({"id": image_id, "file_name": rel, "width": ow, "height": oh, "key": key,
                                  "shard": f"{out_split}/{shard_name}"})
                gt_caps[image_id] = caps
            writer.add(sample_members(key, data, caps[0], meta), len(caps))
        writer.close()
        info = {"shards": [f"{out_split}/{k}" for k in sorted(writer.sizes)], "images": writer.images, "pairs": writer.pairs}
        if out_split in GT_SPLITS:
            gt_path = layout.gt_path(out_dir, out_split)
            write_gt(gt_path, build_gt(gt_images, gt_caps, f"{source} {out_split} from {os.path.basename(karpathy_json)}"))
            info["gt"] = os.path.relpath(gt_path, out_dir)
        summary[out_split] = info
    bar.close()
    manifest = {"generator": f"blip.data.importers ({source})", "format": "img2dataset-webdataset",
                "source": os.path.abspath(karpathy_json), "splits": summary, "skipped": dict(skipped)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "manifest.json"), "wb") as f:
        f.write(dumps(manifest))
    return {**manifest, "timing": {"seconds": round(time.perf_counter() - t0, 2)}}


class _SplitWriter:
    """Fills shards of ``shard_size`` samples in ``split_dir``, img2dataset keys, sizes.json."""

    def __init__(self, split_dir: str, shard_size: int):
        self.split_dir, self.shard_size = split_dir, shard_size
        self.shard, self.members, self.n, self.n_pairs = 0, [], 0, 0
        self.sizes: dict[str, int] = {}
        self.images = self.pairs = 0

    def next_key(self) -> tuple[str, str]:
        """(key of the next sample, name of the tar it goes to)."""
        return make_key(self.shard, self.n), f"{self.shard:05d}.tar"

    def add(self, members: list[tuple[str, bytes]], n_pairs: int) -> None:
        self.members += members
        self.n += 1
        self.n_pairs += n_pairs
        self.images += 1
        self.pairs += n_pairs
        if self.n == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self.n:
            path = write_shard(self.split_dir, self.shard, self.members, self.n, self.n_pairs)
            self.sizes[os.path.basename(path)] = self.n
            self.shard += 1
        self.members, self.n, self.n_pairs = [], 0, 0

    def close(self) -> None:
        self._flush()
        write_sizes(self.split_dir, self.sizes)


def _image_id(entry: dict, key: str | None) -> int:
    if key is not None and isinstance(entry.get(key), int):
        return entry[key]
    stem = os.path.splitext(os.path.basename(entry["filename"]))[0]
    if stem.isdigit():
        return int(stem)
    return int(entry["imgid"])


def import_coco_karpathy(karpathy_json: str, image_root: str, out_dir: str, shard_size: int = 1000, max_side: int | None = None, progress: bool = True) -> dict:
    """COCO (``image_root`` holds ``train2014/``, ``val2014/``) with Karpathy's splits; image ids
    are COCO ids (``cocoid``), as in BLIP's ``coco_karpathy_*_gt.json``."""
    return import_karpathy(karpathy_json, image_root, out_dir, COCO_SPLITS, "cocoid", shard_size, max_side, progress, "coco")


def import_flickr_karpathy(karpathy_json: str, image_root: str, out_dir: str, as_zeroshot: bool = False, shard_size: int = 1000, max_side: int | None = None, progress: bool = True) -> dict:
    """Flickr30k (``image_root`` holds ``1000092795.jpg`` ...); image id = the file name's number.
    ``as_zeroshot``: write only the 1K test split, as ``zeroshot/`` (zero-shot retrieval)."""
    split_map = {"test": "zeroshot"} if as_zeroshot else FLICKR_SPLITS
    return import_karpathy(karpathy_json, image_root, out_dir, split_map, None, shard_size, max_side, progress, "flickr30k")


def inspect_shards(shards) -> dict:
    """Shards and sample counts of a shard set (e.g. an img2dataset output folder), from its
    ``_stats.json``/``sizes.json`` or by reading the tars. Nothing is converted or written."""
    urls = resolve_shards(shards)
    counts = count_shards(urls)
    return {"shards": len(urls), "samples": sum(c.samples for c in counts.values()),
            "pairs": sum(c.pairs for c in counts.values()), "urls": urls}
