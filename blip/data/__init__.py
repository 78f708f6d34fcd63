"""Data layer: the generated noisy-web world, img2dataset-style shards, importers, the loader.

Modules (import from them by name; this package imports nothing, so generating data never
imports torch)::

    generator   generate(GenerateConfig(...), out_dir) -> manifest; SPLITS, EVAL_SPLITS
    world, grammar, render, noise    the generated world (WorldConfig, NOISE_KINDS, DEFAULT_NOISE_MIX)
    layout      DEFAULT_ROOT, split_dir(root, split), gt_path(root, split)
    shards      resolve_shards, count_shards, MAX_SHARD_SIZE; tario: raw tar reading/writing
    loader      BlipLoader(shards, LoaderConfig(...)), make_loader (torch)
    decode, transforms, randaugment, stats    sample decoding and augmentation (torch)
    labels      noise_labels(shards) -> {key: kind | None}: evaluation only, the one reader of labels
    corpus      caption_corpus(shards); text: pre_caption(text, max_words)
    importers   import_coco_karpathy, import_flickr_karpathy, inspect_shards
    contact_sheet   contact_sheet(shards, out_png)

Layout written by ``generate`` and the importers::

    <root>/manifest.json
    <root>/{web,human,val,test,zeroshot}/{00000..}.tar (+ _stats.json, sizes.json)
    <root>/annotations/{val,test,zeroshot}_gt.json
"""
