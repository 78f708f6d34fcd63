"""Evaluation: retrieval (BLIP's ITC top-k + ITM rerank), caption metrics (pycocoevalcap),
filter quality against the generated noise labels, the caption checker (captions against
their scenes), and the side-by-side report table.

Modules (import from them by name; this package imports nothing, so the filter metrics and the
report table need neither torch nor Java)::

    retrieval       itm_eval, itm_ranks, retrieval_scores, evaluate_retrieval(model, tokenizer, shards, k=256, ...),
                    evaluate_retrieval_ranks (the same + per-query ranks)
    intervals       recalls(txt_ranks, img_ranks), paired_bootstrap, pooled (over seeds), detectable_effect
    captioning      caption_metrics(gts, res, meteor="auto"), evaluate_captioning(...), load_gts, java_available
    filter_quality  filter_metrics(itm, labels, itc=None, threshold=0.5), evaluate_filter(scores, web_shards), roc_auc
    caption_check   parse_caption(text), check_caption(text, scene) -> (label, detail), objects_right,
                    scene_of_web(key, cfg), generator_config(web_shards), check_synthetic(scores, web_shards)
    report          metrics_table({"baseline": m0, "CapFilt": m1}) -> markdown, flatten
"""
