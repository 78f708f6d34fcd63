"""CapFilt (paper §3.3): caption every web image, filter web and synthetic texts, assemble the
bootstrapped dataset. Three stages, each a function of typed config + paths, each built on the
shard worker pattern (``shardwork``): one key-aligned result per input shard, written atomically,
skipped when valid, so a crashed or repeated run redoes only missing shards::

    caption_shards(CaptionConfig, captioner_dir, web_shards, out_dir)          -> summary
    score_shards(FilterConfig, filter_dir, web_shards, captions_dir, out_dir)  -> summary
    select(scores_dir, threshold, use_filter, use_captioner)                   -> {table: decisions}
    assemble(AssembleConfig, human_shards, web_shards, scores_dir, out_dir)    -> stats

No Prefect, MLflow or DVC here; metrics go through the optional ``tracker``. Names are imported
lazily, so a worker process that only needs ``shardwork`` does not pay for the model imports.
"""

from __future__ import annotations

import importlib

# Eager: the function shares its module's name, and importing the submodule later would rebind
# ``blip.capfilt.assemble`` to the module. It needs torch (the reader) but not the model stack.
from .assemble import AssembleConfig, assemble

_EXPORTS = {
    "AssembleConfig": "assemble", "assemble": "assemble",
    "CaptionConfig": "caption", "caption_shards": "caption", "image_seed": "caption",
    "FilterConfig": "filter", "score_shards": "filter",
    "resolve_device": "models",  # re-exported from blip.dist
    "PARTS": "selection", "decide": "selection", "select": "selection",
    "ShardResult": "shardwork", "ShardTask": "shardwork", "read_record": "shardwork", "run_shards": "shardwork",
}

__all__ = [  # noqa: RUF022 (grouped by stage, as _EXPORTS)
    "AssembleConfig", "assemble", "CaptionConfig", "caption_shards", "image_seed", "FilterConfig", "score_shards",
    "resolve_device", "PARTS", "decide", "select", "ShardResult", "ShardTask", "read_record", "run_shards",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'blip.capfilt' has no attribute {name!r}")
