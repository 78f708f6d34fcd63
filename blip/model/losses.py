"""BLIP's three pre-training objectives: ITC, ITM (with hard negatives) and LM.

Pure functions on features and logits; the models own the encoders, queues and momentum copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ITM_NEGATIVES


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    sim_targets: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    image_feat_m: torch.Tensor | None = None,
    text_feat_m: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-text contrastive loss with momentum distillation (ALBEF/BLIP).

    ``image_feat``/``text_feat``: student features ``(B, E)``, L2-normalised.
    ``*_feat_all``: ``(E, B + Q)`` momentum batch features followed by the queue.
    ``sim_targets``: ``(B, B + Q)`` ground-truth distribution (one-hot diagonal in pre-training,
    same-image-id positives in retrieval fine-tuning). The soft target is
    ``alpha * softmax(momentum sims) + (1 - alpha) * sim_targets``.

    Returns ``(loss, sim_i2t, sim_t2i)``; the student similarities feed hard-negative mining.
    Computed in float32 even under bf16 autocast: cosines divided by a temperature of ~0.07 would
    otherwise carry bf16's ~0.4% rounding into logit errors of ~0.05 against hundreds of negatives.
    """
    with torch.autocast(image_feat.device.type, enabled=False):
        image_feat, text_feat, image_feat_all, text_feat_all = (
            t.float() for t in (image_feat, text_feat, image_feat_all, text_feat_all))
        temp = temp.float()
        sim_i2t = image_feat @ text_feat_all / temp  # (B, B + Q)
        sim_t2i = text_feat @ image_feat_all / temp
        with torch.no_grad():
            if alpha > 0 and image_feat_m is not None and text_feat_m is not None:
                t_i2t = alpha * F.softmax(image_feat_m.float() @ text_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
                t_t2i = alpha * F.softmax(text_feat_m.float() @ image_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
            else:
                t_i2t = t_t2i = sim_targets
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


def diagonal_targets(batch: int, total: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """``(batch, total)`` one-hot targets: sample i's positive is column ``offset + i``
    (``offset`` = rank × local batch when the columns start with every rank's batch)."""
    t = torch.zeros(batch, total, device=device)
    t[torch.arange(batch), offset + torch.arange(batch)] = 1
    return t


def idx_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """Targets spreading mass uniformly over every column with the same image id."""
    pos = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
    return pos / pos.sum(1, keepdim=True)


def sample_hard_negatives(
    weights: torch.Tensor, generator: torch.Generator | None = None, k: int = 1
) -> torch.Tensor:
    """For each row, draw one column index from ``weights`` (zero weight = never drawn); with
    ``k > 1``, ``k`` of them ``(B, k)``, distinct wherever the row has ``k`` admissible columns.

    ``weights`` must already be zero at each row's positives (the diagonal, or every column of
    the same image). A row with no admissible column falls back to a uniform draw over
    *other* columns, so a batch of near-duplicates never crashes ``torch.multinomial``.
    """
    weights = weights.float().clone()
    empty = weights.sum(1) <= 0
    if empty.any():
        n = weights.shape[1]
        fallback = torch.ones(int(empty.sum()), n, device=weights.device)
        rows = empty.nonzero().squeeze(1)
        if n > 1:
            fallback[torch.arange(len(rows)), rows.clamp(max=n - 1)] = 0
        weights[empty] = fallback
    # without replacement (distinct draws) wherever every row has k admissible columns
    replacement = k > 1 and int((weights > 0).sum(1).min()) < k
    drawn = torch.multinomial(weights, k, replacement=replacement, generator=generator)
    return drawn.squeeze(1) if k == 1 else drawn


def hard_negative_weights(sim: torch.Tensor, positive_mask: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``softmax(sim) + eps`` with positives zeroed (pre-training uses eps=1e-4, retrieval 0)."""
    w = F.softmax(sim.float(), dim=1) + eps
    return w.masked_fill(positive_mask, 0)


def itm_negative_weights(
    sim: torch.Tensor, positive_mask: torch.Tensor, own_sim: torch.Tensor, kind: str = "hard", eps: float = 1e-4
) -> torch.Tensor:
    """Sampling weights ``(B, N)`` over the candidates of each row, zero at its positives.

    ``sim``: row ``b``'s ITC similarity to each candidate (already divided by the temperature);
    ``own_sim`` ``(B,)``: the similarity of row ``b``'s own pair (the reference of
    ``below_positive``; a row with nothing below it draws as ``hard``). A row left with no
    admissible candidate falls back in :func:`sample_hard_negatives` to a uniform draw over the
    other columns.
    """
    if kind == "hard":
        return hard_negative_weights(sim, positive_mask, eps)
    if kind == "uniform":
        return torch.ones_like(sim, dtype=torch.float32).masked_fill(positive_mask, 0)
    if kind == "below_positive":
        hard = hard_negative_weights(sim, positive_mask, eps)
        w = hard.masked_fill(sim.float() >= own_sim.float().view(-1, 1), 0)
        empty = w.sum(1) <= 0  # nothing below the positive: the row draws as ``hard`` does
        return torch.where(empty.view(-1, 1), hard, w)
    raise ValueError(f"itm_negatives={kind!r} unknown; use one of {ITM_NEGATIVES}")


def itm_labels(batch: int, device: torch.device, per_pair: int = 1) -> torch.Tensor:
    """Labels for the ``[pos (B); text+neg image (kB); neg text+image (kB)]`` ITM batch layout
    (``k = per_pair``; BLIP's is ``k = 1``)."""
    return torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * per_pair * batch, dtype=torch.long)]).to(device)


def itm_cross_entropy(logits: torch.Tensor, batch: int, per_pair: int = 1) -> torch.Tensor:
    """ITM's loss over the :func:`itm_labels` layout. With ``per_pair`` negatives of each kind per
    positive, each negative weighs ``1 / per_pair``: a positive still faces two negatives' worth of
    weight, as in BLIP, so the head's prior (its calibration at p = 0.5) stays BLIP's while each
    step shows it ``2 * per_pair`` different negatives. ``per_pair = 1`` is BLIP's plain mean."""
    labels = itm_labels(batch, logits.device, per_pair)
    if per_pair == 1:
        return F.cross_entropy(logits.float(), labels)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    w = torch.cat([ce.new_ones(batch), ce.new_full((2 * per_pair * batch,), 1.0 / per_pair)])
    return (ce * w).sum() / w.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t + 1; ``-100`` labels ignored.

    Mean over the supervised targets, with BLIP's label smoothing (0.1).
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted.float(), targets, ignore_index=-100, label_smoothing=label_smoothing)


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """LM targets: the ids with padding and the first ``prompt_length`` positions set to -100.

    ``prompt_length`` counts position 0 ([DEC]) plus the prompt's word pieces ("a picture of"
    → 4), so after the one-token shift the first supervised target is the first caption word.
    """
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if prompt_length:
        labels[:, :prompt_length] = -100
    return labels


def alpha_ramp(alpha: float, step: int, ramp_steps: int) -> float:
    """Distillation weight ramped linearly from 0 to ``alpha`` over ``ramp_steps`` (BLIP: 2 epochs)."""
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)
