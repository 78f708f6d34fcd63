"""AdamW parameter groups and BLIP's learning-rate schedules (pure functions of the position)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


VISION_PREFIX = "visual_encoder."


def param_groups(model: torch.nn.Module, weight_decay: float, vision_lr_scale: float = 1.0) -> list[dict]:
    """Decay on weight matrices; none on biases, norms, 1-D parameters, tokens and ``temp``
    (as LAVIS; the original BLIP decayed everything).

    ``vision_lr_scale``: the ViT's (``visual_encoder.*``) learning rate as a fraction of the
    schedule's; each group carries its ``lr_scale`` for :func:`set_lr`. BLIP starts both towers
    pre-trained; a model whose ViT is warm-started and whose text towers start from random weights
    needs the text side faster than the ViT can take (docs/recipe.md: ITM leaves its prior only so)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():  # unique parameters: tied ones appear once
        if not p.requires_grad:
            continue
        vision = vision_lr_scale != 1.0 and name.startswith(VISION_PREFIX)
        groups.setdefault((name in skip or p.ndim <= 1, vision), []).append(p)
    order = [(False, False), (True, False), (False, True), (True, True)]
    return [
        {"params": groups[k], "weight_decay": 0.0 if k[0] else weight_decay,
         "lr_scale": vision_lr_scale if k[1] else 1.0}
        for k in order if k in groups or not k[1]
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
