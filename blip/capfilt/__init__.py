"""CapFilt (paper §3.3): caption every web image, filter web and synthetic texts, assemble the
bootstrapped dataset. Three engines, each a function of a typed config + paths, each built on
the shard worker pattern (``shardwork``): one key-aligned result per input shard, written
atomically, skipped when valid, so a crashed or repeated run redoes only missing shards::

    caption.caption_shards(CaptionConfig, captioner_dir, web_shards, out_dir)          -> summary
    filter.score_shards(FilterConfig, filter_dir, web_shards, captions_dir, out_dir)   -> summary
    selection.select(scores_dir, threshold, use_filter, use_captioner)                 -> {table: decisions}
    assemble.assemble(AssembleConfig, human_shards, web_shards, scores_dir, out_dir)   -> stats

``config`` holds the typed sections and the names they allow (torch-free). No Prefect, MLflow
or DVC here; metrics go through the optional ``tracker``. This package imports nothing itself:
a worker process that only needs ``shardwork`` does not pay for the model imports.
"""
