"""Data layer: the generated noisy-web world, img2dataset-style shards, importers, the loader.

Public API (imported lazily, so generating data does not import torch)::

    generate(GenerateConfig(...), out_dir="data/generated")     -> manifest dict
    BlipLoader(shards, LoaderConfig(...), rank=None, world_size=None) / make_loader(shards, **cfg)
    noise_labels(shards) -> {key: kind | None}        # evaluation only; the one reader of labels
    caption_corpus(shards) -> Iterator[str]            # tokenizer corpus
    pre_caption(text, max_words)
    import_coco_karpathy(...), import_flickr_karpathy(...), inspect_shards(shards)
    contact_sheet(shards, out_png)
    split_dir(root, split), gt_path(root, split)       # the default layout

Layout written by ``generate`` and the importers::

    <root>/manifest.json
    <root>/{web,human,val,test,zeroshot}/{00000..}.tar (+ _stats.json, sizes.json)
    <root>/annotations/{val,test,zeroshot}_gt.json
"""

from __future__ import annotations

import importlib
import os

DEFAULT_ROOT = "data/generated"

_EXPORTS = {
    "generate": "generator", "GenerateConfig": "generator", "SPLITS": "generator", "EVAL_SPLITS": "generator",
    "WorldConfig": "world",
    "BlipLoader": "loader", "LoaderConfig": "loader", "make_loader": "loader",
    "DecodeConfig": "decode", "LoaderStats": "stats",
    "noise_labels": "labels", "NOISE_KINDS": "noise", "DEFAULT_NOISE_MIX": "noise",
    "caption_corpus": "corpus", "pre_caption": "text",
    "import_coco_karpathy": "importers", "import_flickr_karpathy": "importers", "inspect_shards": "importers",
    "contact_sheet": "contact_sheet",
    "resolve_shards": "shards", "count_shards": "shards",
    "CLIP_MEAN": "transforms", "CLIP_STD": "transforms",
    "PRETRAIN_MIN_SCALE": "transforms", "FINETUNE_MIN_SCALE": "transforms",
}

__all__ = sorted(_EXPORTS) + ["DEFAULT_ROOT", "split_dir", "gt_path"]


def split_dir(root: str, split: str) -> str:
    """Folder of a split's shards, e.g. ``data/generated/web``."""
    return os.path.join(root, split)


def gt_path(root: str, split: str) -> str:
    """COCO-format ground truth of an eval split, e.g. ``data/generated/annotations/val_gt.json``."""
    return os.path.join(root, "annotations", f"{split}_gt.json")


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'blip.data' has no attribute {name!r}")
