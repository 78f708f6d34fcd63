"""Image-text retrieval evaluation, as BLIP's ``train_retrieval.py::evaluation`` (blip-facts §1.10).

1. ITC features for every image (the ViT tokens are kept for ITM) and every caption (about five
   per image, ``max_length`` 35).
2. ``sims = image_feat @ text_feat.T``: a plain cosine, **not** divided by the temperature.
3. Image→text: for each image, the ITC top-``k`` texts (``k`` 256 for COCO, 128 for Flickr,
   clipped to the number of candidates) are reranked by the image-grounded encoder:
   score = ITM raw match logit (column 1, no softmax) + the ITC cosine; every other entry is
   −100. Text→image is symmetric over the top-``k`` images.
4. ``itm_eval``: TR@1/5/10 (best rank among the image's ground-truth captions), IR@1/5/10, the
   means and ``r_mean``, in percent — the numbers the paper's Tables 5/6 report.

Model inference (:func:`retrieval_scores`) and the metric (:func:`itm_eval`, numpy only) are
separate, so the metric can be checked against a brute-force reference and reused on any score
matrices. :func:`itm_ranks` keeps the per-query ranks the metric is made of, and
:func:`evaluate_retrieval_ranks` returns them with the image ids, for the paired bootstrap
intervals of ``blip.evaluate.intervals``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .. import dist
from ..model.scoring import (
    cosine_similarity,
    image_embeddings,
    itm_scores,
    text_embeddings,
)
from .intervals import recalls

_log = logging.getLogger("blip.evaluate")

TEXT_MAX_LENGTH = 35  # BLIP's retrieval eval tokenises with max_length 35
FILL = -100.0  # score of every pair outside the ITC top-k (as BLIP)
K_COCO, K_FLICKR = 256, 128  # ``k_test`` in retrieval_coco.yaml / retrieval_flickr.yaml


def _best_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of the best-scored positive in each row.

    Rank = number of *non-positive* candidates scoring at least as high as the row's best
    positive. Without ties this is BLIP's ``np.where(np.argsort(score)[::-1] == i)``; with
    ties (the −100 fill, a constant model) a wrong candidate tied with the best positive
    counts as ranked above it, so ties never inflate recall (BLIP's argsort order among ties
    is arbitrary). A row without positives gets rank ``n_candidates`` (a miss, as BLIP's 1e20).
    """
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    ranks = ((scores >= best) & ~positive).sum(axis=1)
    return np.where(positive.any(axis=1), ranks, scores.shape[1])


def itm_ranks(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    txt2img: Sequence[int] | np.ndarray | Mapping[int, int],
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
    """The per-query 0-based best ranks ``itm_eval`` scores: ``txt_ranks`` ``(N_img,)`` (per image,
    the rank of its best-scored text), ``img_ranks`` ``(N_txt,)`` (per text, the rank of its image)
    and ``txt2img`` ``(N_txt,)`` as an int64 array. Arguments as :func:`itm_eval`; the bootstrap
    intervals (``blip.evaluate.intervals``) resample these."""
    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    n_img, n_txt = score_i2t.shape
    if isinstance(txt2img, Mapping):  # BLIP's dataset attributes are dicts keyed 0..N-1
        txt2img = [txt2img[t] for t in range(len(txt2img))]
    if isinstance(img2txt, Mapping):
        img2txt = [img2txt[i] for i in range(len(img2txt))]
    if score_t2i.shape != (n_txt, n_img):
        raise ValueError(f"score_t2i has shape {score_t2i.shape}, expected {(n_txt, n_img)} (transpose of score_i2t)")
    txt2img = np.asarray(txt2img, dtype=np.int64)
    if txt2img.shape != (n_txt,) or len(img2txt) != n_img:
        raise ValueError(f"txt2img has {txt2img.shape[0]} entries and img2txt {len(img2txt)} for a "
                         f"{n_img} x {n_txt} score matrix")
    txt_ranks, img_ranks = [], []
    for s in range(0, n_img, chunk):  # row chunks keep the boolean temporaries small
        rows = score_i2t[s : s + chunk]
        pos = np.zeros(rows.shape, dtype=bool)
        for r, i in enumerate(range(s, s + rows.shape[0])):
            pos[r, np.asarray(img2txt[i], dtype=np.int64)] = True
        txt_ranks.append(_best_ranks(rows, pos))
    for s in range(0, n_txt, chunk):
        rows = score_t2i[s : s + chunk]
        pos = np.zeros(rows.shape, dtype=bool)
        pos[np.arange(rows.shape[0]), txt2img[s : s + chunk]] = True
        img_ranks.append(_best_ranks(rows, pos))
    empty = np.zeros(0, dtype=np.int64)
    return {"txt_ranks": np.concatenate(txt_ranks) if txt_ranks else empty,
            "img_ranks": np.concatenate(img_ranks) if img_ranks else empty, "txt2img": txt2img}


def itm_eval(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    txt2img: Sequence[int] | np.ndarray | Mapping[int, int],
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    chunk: int = 1024,
) -> dict[str, float]:
    """BLIP's ``itm_eval``: recall at 1/5/10 in percent, both directions.

    ``score_i2t`` ``(N_img, N_txt)``, ``score_t2i`` ``(N_txt, N_img)``; ``txt2img[t]``: the image
    of text ``t``; ``img2txt[i]``: the texts of image ``i`` (lists, or dicts as BLIP's datasets
    hold them). Image→text ranks use ``img2txt``, text→image ranks use ``txt2img``, as BLIP.
    Returns ``txt_r1, txt_r5, txt_r10, txt_r_mean,
    img_r1, img_r5, img_r10, img_r_mean, r_mean``. Ties: see :func:`_best_ranks`; the ranks
    themselves: :func:`itm_ranks`.
    """
    r = itm_ranks(score_i2t, score_t2i, txt2img, img2txt, chunk)
    return recalls(r["txt_ranks"], r["img_ranks"])


def _rerank(
    model,
    sims: torch.Tensor,
    rows: list[int],
    k: int,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_to_text: bool,
    batch_size: int,
    group: int,
    out: torch.Tensor,
) -> None:
    """Fill ``out[rows]`` with ITM logit + cosine on each row's ITC top-``k`` columns.

    ``sims`` rows are queries (images for ``image_to_text``, else texts), columns candidates.
    Queries go in groups of ``group``; each group's images are moved to the device once and
    every pair points at its image by index (no copy of the ViT tokens per pair).
    """
    device = sims.device
    for g in range(0, len(rows), group):
        q = torch.tensor(rows[g : g + group], device=device)
        topk_sim, topk_idx = sims[q].topk(k, dim=1)  # (G, k)
        if image_to_text:
            img_rows = q.cpu()
            image_index = torch.arange(len(q), device=device).repeat_interleave(k)
            txt_rows = topk_idx.reshape(-1).cpu()
        else:
            img_rows, inverse = torch.unique(topk_idx.reshape(-1).cpu(), return_inverse=True)
            image_index = inverse.to(device)
            txt_rows = q.cpu().repeat_interleave(k)
        logit = itm_scores(
            model, image_embeds[img_rows].to(device), input_ids[txt_rows].to(device),
            attention_mask[txt_rows].to(device), image_index=image_index, batch_size=batch_size,
        ).logit
        out[q] = out[q].scatter(1, topk_idx, logit.view(len(q), k) + topk_sim)


def retrieval_scores(
    model,
    tokenizer,
    shards,
    k: int = K_COCO,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(score_i2t, score_t2i, txt2img, img2txt)`` for every image and caption of ``shards``
    (:func:`scored_queries` without the image ids)."""
    return scored_queries(model, tokenizer, shards, k, batch_size, device, **kwargs)[:4]


@torch.no_grad()
def scored_queries(
    model,
    tokenizer,
    shards,
    k: int = K_COCO,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    text_max_length: int = TEXT_MAX_LENGTH,
    max_words: int = 30,
    itm_batch_size: int = 128,
    queries_per_step: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], list[int]]:
    """``(score_i2t, score_t2i, txt2img, img2txt, image_ids)`` for every image and caption of
    ``shards``; ``image_ids[i]``: the loader's ``image_id`` of image row ``i`` (the COCO id of the
    eval splits), so two models' ranks can be checked to be over the same queries.

    ``model``: anything with ITC and ITM towers (``BlipRetrieval``, ``BlipPretrain``).
    Images are read once, in shard order, at the model's image size (eval transform); texts are
    all cleaned captions of each image (``pre_caption``, ``max_words`` 30 as BLIP's COCO eval).
    ``batch_size``: images per ViT batch; ``itm_batch_size``: pairs per ITM forward;
    ``queries_per_step``: images (or texts) reranked together (default
    ``max(1, 4 * itm_batch_size // k)``; BLIP reranks one query, k pairs, at a time).
    Under torch.distributed every rank reads all images, scores its share of the query rows
    and the matrices are summed over ranks, as BLIP; every rank returns the full matrices.
    """
    from ..data.loader import make_loader

    was_training = model.training
    model.eval()
    try:
        loader = make_loader(shards, batch_size=batch_size, image_size=model.cfg.vision.image_size, train=False,
                             max_words=max_words, num_workers=num_workers, rank=0, world_size=1)
        embeds, img_feats, texts, txt2img, img2txt, image_ids = [], [], [], [], [], []
        for batch in loader:
            image_ids += batch["image_id"].tolist()
            e, f = image_embeddings(model, batch["image"].to(device), batch_size)
            embeds.append(e.cpu())  # ViT tokens stay on the host, as BLIP
            img_feats.append(f)
            for caps in batch["captions"]:
                img2txt.append(np.arange(len(texts), len(texts) + len(caps)))
                txt2img += [len(img2txt) - 1] * len(caps)
                texts += caps
        if not texts:
            raise ValueError(f"no images with captions in {shards!r}")
        image_embeds, image_feats = torch.cat(embeds), torch.cat(img_feats)
        tok = tokenizer(texts, max_length=text_max_length)
        ids, mask = tok.input_ids, tok.attention_mask
        text_feats = text_embeddings(model, ids.to(device), mask.to(device))
        sims = cosine_similarity(image_feats, text_feats)  # (N_img, N_txt), not divided by temp
        n_img, n_txt = sims.shape
        _log.info("retrieval: %d images, %d texts, k=%d", n_img, n_txt, k)

        rank, world = dist.rank(), dist.world_size()
        score_i2t = torch.zeros(n_img, n_txt, device=device)
        score_t2i = torch.zeros(n_txt, n_img, device=device)
        mine_i, mine_t = list(range(rank, n_img, world)), list(range(rank, n_txt, world))
        score_i2t[mine_i] = FILL  # rows of other ranks stay 0, so the SUM below is exact
        score_t2i[mine_t] = FILL
        k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
        qps, ib = queries_per_step, itm_batch_size
        _rerank(model, sims, mine_i, k_i2t, image_embeds, ids, mask, True, ib,
                qps or max(1, 4 * ib // k_i2t), score_i2t)
        _rerank(model, sims.T, mine_t, k_t2i, image_embeds, ids, mask, False, ib,
                qps or max(1, 4 * ib // k_t2i), score_t2i)
        if world > 1:
            torch.distributed.all_reduce(score_i2t)
            torch.distributed.all_reduce(score_t2i)
    finally:
        model.train(was_training)
    return (score_i2t.cpu().numpy(), score_t2i.cpu().numpy(), np.asarray(txt2img, dtype=np.int64), img2txt,
            image_ids)


def evaluate_retrieval(
    model,
    tokenizer,
    shards,
    k: int = K_COCO,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    **kwargs,
) -> dict[str, float | int]:
    """Retrieval metrics of ``model`` on ``shards`` (:func:`retrieval_scores` + :func:`itm_eval`).

    Returns the ``itm_eval`` keys (percent) plus ``n_images``, ``n_texts`` and ``k``.
    Use it for the fine-tuned split (COCO role, k 256) and the zero-shot split (Flickr role,
    k 128) alike; zero-shot just means a model not fine-tuned on that split's distribution.
    """
    return evaluate_retrieval_ranks(model, tokenizer, shards, k, batch_size, device, **kwargs)[0]


def evaluate_retrieval_ranks(
    model,
    tokenizer,
    shards,
    k: int = K_COCO,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    **kwargs,
) -> tuple[dict[str, float | int], dict[str, list]]:
    """``(metrics, ranks)``: :func:`evaluate_retrieval`'s metrics, and the per-query ranks they
    come from as JSON-ready lists — ``txt_ranks`` (per image), ``img_ranks`` (per text),
    ``txt2img`` (the image row of each text) and ``image_ids`` (per image row), the input of
    ``blip.evaluate.intervals``."""
    score_i2t, score_t2i, txt2img, img2txt, image_ids = scored_queries(model, tokenizer, shards, k, batch_size,
                                                                       device, **kwargs)
    r = itm_ranks(score_i2t, score_t2i, txt2img, img2txt)
    metrics: dict[str, float | int] = dict(recalls(r["txt_ranks"], r["img_ranks"]))
    metrics.update(n_images=score_i2t.shape[0], n_texts=score_i2t.shape[1], k=k)
    ranks = {name: [int(v) for v in r[name]] for name in ("txt_ranks", "img_ranks", "txt2img")}
    return metrics, {**ranks, "image_ids": [int(v) for v in image_ids]}
