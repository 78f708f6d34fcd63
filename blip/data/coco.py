"""Ground truth in COCO caption format, as pycocotools' ``COCO()`` and BLIP's evaluation load it.

Layout::

    {"info": {...}, "licenses": [], "type": "captions",
     "images": [{"id": int, "file_name": str, "width": int, "height": int, "key": str, "shard": str}],
     "annotations": [{"id": int, "image_id": int, "caption": str}]}

``image_id`` equals the ``image_id`` field in the shard's ``.json``, which the loader puts in
``batch["image_id"]``, so predictions from a shard loader can be scored against this file
directly. Captions are stored raw (not ``pre_caption``-ed): the COCO caption evaluation tokenizes
them itself, as it does for the official Karpathy files.
"""

from __future__ import annotations

import json
import os

from ..atomic import atomic_path


def build_gt(images: list[dict], captions: dict[int, list[str]], description: str) -> dict:
    """GT dict from image records (must hold ``id``) and ``image_id -> captions``.

    Annotation ids run 0, 1, ... over images in the order given, captions in their order, so the
    file is a pure function of its inputs.
    """
    annotations = []
    for img in images:
        for cap in captions[img["id"]]:
            annotations.append({"id": len(annotations), "image_id": img["id"], "caption": cap})
    return {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }


def write_gt(path: str, gt: dict) -> None:
    """Write atomically with sorted keys (reproducible bytes)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(gt, f, sort_keys=True, ensure_ascii=False)
