"""Scoring API for filtering and retrieval: ITM p(match) and logits, ITC features and cosines.

Works with any model that has the ITC/ITM towers (``BlipRetrieval`` — the filter — and
``BlipPretrain``). Everything is batched and runs under ``torch.no_grad`` in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blip import BlipBase


@dataclass
class ITMScores:
    prob: torch.Tensor  # (N,) softmax p(match): the CapFilt filter keeps prob >= threshold (0.5)
    logit: torch.Tensor  # (N,) raw match logit (column 1): retrieval reranking adds it to the ITC cosine


@torch.no_grad()
def image_embeddings(model: BlipBase, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT tokens ``(N, 1 + P, D_v)`` and normalised ITC features ``(N, E)`` for ``images``."""
    embeds, feats = [], []
    for i in range(0, images.shape[0], batch_size):
        e = model.encode_image(images[i : i + batch_size])
        embeds.append(e)
        feats.append(model.image_features(e))
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def text_embeddings(
    model: BlipBase, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Normalised ITC text features ``(N, E)``."""
    return torch.cat(
        [
            model.text_features(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
            for i in range(0, input_ids.shape[0], batch_size)
        ]
    )


def cosine_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``(N_img, N_txt)`` cosines of normalised features (not divided by temp, as BLIP's eval)."""
    return F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T


@torch.no_grad()
def itm_scores(
    model: BlipBase,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_index: torch.Tensor | None = None,
    batch_size: int = 128,
) -> ITMScores:
    """ITM scores for N (image, text) pairs.

    ``image_embeds``: ``(M, 1 + P, D_v)`` ViT tokens, computed once per image;
    ``image_index``: ``(N,)`` row of ``image_embeds`` for each text (default ``arange(N)``), so
    an image scored against several texts (its web text and its synthetic caption) goes through
    the ViT once. Texts get [ENC] at position 0 (official training and retrieval eval).
    """
    N = input_ids.shape[0]
    if image_index is None:
        if image_embeds.shape[0] != N:
            raise ValueError(f"{image_embeds.shape[0]} images for {N} texts: pass image_index")
        image_index = torch.arange(N, device=input_ids.device)
    # Chunks of similar length, each trimmed to its longest text: less padding, same numbers.
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(N, 2, device=input_ids.device)
    for i in range(0, N, batch_size):
        rows = order[i : i + batch_size]
        T = int(lengths[rows].max())
        # each chunk's images go through the cross-attention key/value projections once
        imgs, inverse = torch.unique(image_index[rows], return_inverse=True)
        out[rows] = model.itm_logits(image_embeds[imgs], input_ids[rows, :T], attention_mask[rows, :T], inverse).float()
    return ITMScores(prob=out.softmax(dim=-1)[:, 1], logit=out[:, 1])
