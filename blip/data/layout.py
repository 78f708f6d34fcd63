"""Where the splits live: ``<root>/<split>/`` shards and ``<root>/annotations/<split>_gt.json``."""

from __future__ import annotations

import os

DEFAULT_ROOT = "data/generated"


def split_dir(root: str, split: str) -> str:
    """Folder of a split's shards, e.g. ``data/generated/web``."""
    return os.path.join(root, split)


def gt_path(root: str, split: str) -> str:
    """COCO-format ground truth of an eval split, e.g. ``data/generated/annotations/val_gt.json``."""
    return os.path.join(root, "annotations", f"{split}_gt.json")
