"""AdamW parameter groups and BLIP's learning-rate schedules (pure functions of the position)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weight matrices; none on biases, norms, 1-D parameters, tokens and ``temp``
    (as LAVIS; the original BLIP decayed everything)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # unique parameters: tied ones appear once
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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
    for g in optimizer.param_groups:
        g["lr"] = lr
