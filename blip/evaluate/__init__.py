"""Evaluation: retrieval (BLIP's ITC top-k + ITM rerank), caption metrics (pycocoevalcap),
filter quality against the generated noise labels, and the side-by-side report table.

Public API (imported lazily: the filter metrics and the table need neither torch nor Java)::

    itm_eval(score_i2t, score_t2i, txt2img, img2txt) -> {txt_r1, ..., r_mean}
    retrieval_scores(model, tokenizer, shards, k, batch_size, device) -> (score_i2t, score_t2i, txt2img, img2txt)
    evaluate_retrieval(model, tokenizer, shards, k=256, ...) -> metrics
    caption_metrics(gts, res, meteor="auto") -> {Bleu_1..4, METEOR, ROUGE_L, CIDEr, skipped, ...}
    evaluate_captioning(captioner, tokenizer, shards, gt_json, gen_cfg, ...) -> (metrics, predictions)
    filter_metrics(itm, labels, itc=None, threshold=0.5) / evaluate_filter(scores, web_shards) -> metrics
    metrics_table({"baseline": m0, "CapFilt": m1}) -> markdown
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "itm_eval": "retrieval", "retrieval_scores": "retrieval", "evaluate_retrieval": "retrieval",
    "K_COCO": "retrieval", "K_FLICKR": "retrieval",
    "caption_metrics": "captioning", "evaluate_captioning": "captioning", "load_gts": "captioning",
    "java_available": "captioning",
    "filter_metrics": "filter_quality", "evaluate_filter": "filter_quality", "load_filter_scores": "filter_quality",
    "roc_auc": "filter_quality",
    "metrics_table": "report", "flatten": "report",
}

__all__ = [  # noqa: RUF022 — grouped by module, as _EXPORTS
    "itm_eval", "retrieval_scores", "evaluate_retrieval", "K_COCO", "K_FLICKR",
    "caption_metrics", "evaluate_captioning", "load_gts", "java_available",
    "filter_metrics", "evaluate_filter", "load_filter_scores", "roc_auc",
    "metrics_table", "flatten",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'blip.evaluate' has no attribute {name!r}")
