"""AdamW parameter groups and BLIP's learning-rate schedules (pure functions of the position)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


VISION_PREFIX = "visual_encoder."
ITM_HEAD_PREFIX = "itm_head."


def param_groups(
    model: torch.nn.Module, weight_decay: float, vision_lr_scale: float = 1.0, cross_lr_scale: float = 1.0
) -> list[dict]:
    """Decay on weight matrices; none on biases, norms, 1-D parameters, tokens and ``temp``
    (as LAVIS; the original BLIP decayed everything).

    ``vision_lr_scale``: the ViT's (``visual_encoder.*``) learning rate as a fraction of the
    schedule's; each group carries its ``lr_scale`` for :func:`set_lr`. BLIP starts both towers
    pre-trained; a model whose ViT is warm-started and whose text towers start from random weights
    needs the text side faster than the ViT can take (docs/recipe.md: ITM leaves its prior only so).
    ``cross_lr_scale``: likewise for what only image-text matching and captioning train on top of
    the towers — the text layers' cross-attention to the image and the ITM head."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():  # unique parameters: tied ones appear once
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith(VISION_PREFIX):
            scale = vision_lr_scale
        elif ".crossattention." in name or name.startswith(ITM_HEAD_PREFIX):
            scale = cross_lr_scale
        groups.setdefault((name in skip or p.ndim <= 1, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        for (no_decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0]))
    ]


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int) -> float:
    """Learning rate for optimizer step ``step_in_epoch`` of ``epoch``.

    ``step``: per-step linear warm-up from ``warmup_lr`` over ``warmup_steps`` in epoch 0, then
    ``max(min_lr, lr * lr_decay_rate ** epoch)`` (BLIP's pretrain.py). ``cosine``: per epoch,
    ``(lr - min_lr) * 0.5 * (1 + cos(pi * epoch / epochs)) + min_lr``, no warm-up (fine-tuning).
    """
    if cfg.schedule == "cosine":
        return (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs)) + cfg.min_lr
    if epoch == 0 and step_in_epoch < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step_in_epoch / max(1, cfg.warmup_steps)
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay_rate**epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's ``lr`` times each group's ``lr_scale`` (1 when absent)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
