"""Unimodal warm start of the image encoder: the ImageNet role at the embedded scale.

BLIP never pre-trains from random weights: its ViT comes from ImageNet (DeiT) and its text
transformer from BERT (blip-facts.md). A ViT trained from scratch on a few thousand noisy pairs
learns nothing to match texts with (docs/recipe.md: its image features collapse to one vector,
ITM stays at its prior), so the default pipeline gives it what ImageNet gives BLIP — supervised
pre-training on a *labelled* image set of the same world, disjoint from every pair split:

* images: scenes of the generated world (``world.SPLIT_IDS["labelled"]``, own seeds), rendered
  exactly as the pair splits; no captions, no noise;
* labels: a multi-hot vector of what a classifier of that world would annotate — shapes and
  colours present, each (colour, shape) object kind present, sizes present, the number of objects,
  the layout (position or relation) and the background (:func:`label_names`);
* objective: binary cross-entropy on a linear head over the ViT's class token (DeiT's token),
  each label group weighing the same (else the 80 object kinds drown the 3 object counts),
  AdamW with linear warm-up and cosine decay, bfloat16 autocast where the hardware has it.

The result is a ViT state dict (timm names, as ``visual_encoder.*``) plus a JSON card with the
config, the label names and held-out accuracies; :func:`load_vision_init` copies it into a fresh
``BlipPretrain`` (its momentum ViT too). Real-scale runs point ``model.vision_init`` at their own
warm-start directory made the same way, or use released BLIP checkpoints directly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.progress import progress_bar
from ..data.render import render
from ..data.transforms import normalize
from ..data.world import (
    POSITIONS,
    RELATIONS,
    SIZES,
    TRAIN_BACKGROUNDS,
    Scene,
    WorldConfig,
    sample_rngs,
    sample_scene,
)
from ..dist import train_autocast
from ..evaluate.filter_quality import roc_auc
from ..model.config import VisionConfig
from .config import WarmstartConfig
from .optim import param_groups

WEIGHTS = "vision.safetensors"
CARD = "vision.json"
FORMAT = "blip-bootstrap/vision-warmstart-v1"
LAYOUTS = POSITIONS + RELATIONS
MAX_OBJECTS = 3


def label_names(world: WorldConfig) -> list[str]:
    """Names of the multi-hot label vector, in order (groups of :func:`label_groups`)."""
    return (
        [f"shape:{s}" for s in world.shapes]
        + [f"colour:{c}" for c in world.colours]
        + [f"object:{c} {s}" for s in world.shapes for c in world.colours]
        + [f"size:{s}" for s in SIZES]
        + [f"objects:{n}" for n in range(1, MAX_OBJECTS + 1)]
        + [f"layout:{lay}" for lay in LAYOUTS]
        + [f"background:{b}" for b in TRAIN_BACKGROUNDS]
    )


def label_groups(names: list[str]) -> dict[str, list[int]]:
    """Label indices by group (``shape``, ``colour``, ``object``, ...)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.split(":", 1)[0], []).append(i)
    return groups


def scene_labels(scene: Scene, names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    y = np.zeros(len(names), np.float32)
    on = [f"objects:{scene.n_objects}", f"layout:{scene.layout}", f"background:{scene.background}"]
    for g in scene.groups:
        on += [f"shape:{g.shape}", f"colour:{g.colour}", f"object:{g.colour} {g.shape}", f"size:{g.size}"]
    for n in on:
        y[index[n]] = 1.0
    return y


def labelled_set(n: int, seed: int, world: WorldConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 (n, 3, S, S), labels float (n, L), label names)`` of the labelled split."""
    names = label_names(world)
    images = torch.empty(n, 3, world.image_size, world.image_size, dtype=torch.uint8)
    labels = np.empty((n, len(names)), np.float32)
    for i in range(n):
        rngs = sample_rngs(seed, "labelled", i)
        scene = sample_scene(rngs[0], world, TRAIN_BACKGROUNDS)
        images[i] = torch.from_numpy(np.array(render(scene, rngs[1], world))).permute(2, 0, 1)
        labels[i] = scene_labels(scene, names)
    return images, torch.from_numpy(labels), names


@torch.no_grad()
def held_out_metrics(vit, head, images, labels, names, device, batch_size: int = 256) -> dict[str, float]:
    """Per label group: exact-match accuracy of the group's bits and mean ROC-AUC of its labels."""
    vit.eval()
    logits = torch.cat([head(vit(normalize(images[i:i + batch_size]).to(device))[:, 0]).float().cpu()
                        for i in range(0, len(images), batch_size)])
    vit.train()
    pred, y = (logits > 0).float(), labels
    out: dict[str, float] = {}
    for group, idx in label_groups(names).items():
        out[f"{group}/exact"] = round(float((pred[:, idx] == y[:, idx]).all(1).float().mean()), 4)
        aucs = [roc_auc(logits[:, j].numpy(), y[:, j].numpy() > 0) for j in idx if 0 < y[:, j].sum() < len(y)]
        out[f"{group}/auc"] = round(float(np.mean(aucs)), 4) if aucs else float("nan")
    return out


def warm_start_loop(desc: str, metric: str, cfg, opt: torch.optim.Optimizer, n_train: int, loss_of,
                    tracker, on_step=None) -> dict[str, Any]:
    """The warm starts' training loop (vision and text): ``cfg.epochs`` passes over random batches
    of the ``n_train`` training indices (the partial last batch dropped), linear warm-up over
    ``cfg.warmup_steps`` then cosine decay of ``cfg.lr``. ``loss_of(indices, generator)`` returns the
    batch's loss (the generator: the run's, for any randomness of the batch such as MLM masking).
    ``on_step(step)``, when given, runs after every optimiser step (held-out curves).
    Returns ``steps``, ``first`` and ``final`` (EMA) loss, ``seconds``."""
    steps_per_epoch = n_train // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(total, cfg.progress, desc, unit="step")
    step, t0, loss_ema, first = 0, time.perf_counter(), None, None
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(steps_per_epoch):
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_of(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size], gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            first = value if first is None else first
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            if step % 10 == 0 or step == total:
                tracker.log_metrics({f"train/{metric}": value, "train/lr": lr}, step=step)
            if on_step is not None:
                on_step(step)
            bar.set_postfix({metric: f"{loss_ema:.4f}"}, refresh=False)
            bar.update(1)
    bar.close()
    return {"steps": step, "first": first, "final": loss_ema, "seconds": time.perf_counter() - t0}


def train_vision(cfg: WarmstartConfig, vision: VisionConfig, world: WorldConfig, out_dir: str | Path,
                 tracker=None) -> dict[str, Any]:
    """Train ``vision``'s ViT on the labelled set; write ``vision.safetensors`` + ``vision.json``."""
    from .. import dist
    from ..model.vit import VisionEncoder
    from ..track import NullTracker

    tracker = tracker or NullTracker()
    if vision.image_size != world.image_size:
        raise ValueError(f"model image_size {vision.image_size} != world image_size {world.image_size}")
    device = dist.resolve_device(cfg.device)
    t0 = time.perf_counter()
    images, labels, names = labelled_set(cfg.images, cfg.seed, world)
    gen_s = time.perf_counter() - t0
    n_train = cfg.images - cfg.held_out
    torch.manual_seed(cfg.seed)
    vit = VisionEncoder(vision).to(device)
    head = nn.Linear(vision.width, len(names)).to(device)
    groups = param_groups(vit, cfg.weight_decay)  # the trainer's rule (timm's no_weight_decay: pos_embed, cls_token)
    groups[0]["params"].append(head.weight)
    groups[1]["params"].append(head.bias)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    groups = label_groups(names)
    weights = torch.zeros(len(names), device=device)
    for idx in groups.values():
        weights[idx] = 1.0 / (len(idx) * len(groups))
    bf16 = dist.bf16_enabled(cfg.bf16, device)

    def loss_of(idx: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
        with train_autocast(device, bf16):
            logits = head(vit(normalize(images[idx]).to(device))[:, 0])
        per_label = F.binary_cross_entropy_with_logits(logits.float(), labels[idx].to(device), reduction="none")
        return (per_label.mean(0) * weights).sum()  # every label group weighs the same

    curve: list[dict[str, float]] = []

    def measure(step: int) -> None:
        if cfg.eval_every and step % cfg.eval_every == 0:
            m = held_out_metrics(vit, head, images[n_train:], labels[n_train:], names, device)
            curve.append({"step": step, **{k: v for k, v in m.items() if k.endswith("/auc")}})
            tracker.log_metrics({f"held_out/{k}": v for k, v in m.items()}, step=step)

    run = warm_start_loop("warmstart_vision", "bce", cfg, opt, n_train, loss_of, tracker, on_step=measure)
    step, first, loss_ema, train_s = run["steps"], run["first"], run["final"], run["seconds"]
    metrics = held_out_metrics(vit, head, images[n_train:], labels[n_train:], names, device)
    summary = {"format": FORMAT, "vision": asdict(vision), "world": asdict(world), "warmstart": asdict(cfg),
               "labels": names, "steps": step, "first_bce": round(first or float("nan"), 5),
               "final_bce": round(loss_ema or float("nan"), 5),
               "images_per_s": round(step * cfg.batch_size / train_s, 1) if train_s else None,
               "generate_seconds": round(gen_s, 2), "train_seconds": round(train_s, 2), "bf16": bf16,
               "held_out": metrics, **({"held_out_curve": curve} if curve else {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}, str(out / WEIGHTS),
              metadata={"format": FORMAT})
    (out / CARD).write_text(json.dumps(card(summary), indent=2))
    tracker.log_metrics({f"held_out/{k}": v for k, v in metrics.items()}, step=step)
    return summary


def card(summary: dict) -> dict:
    """What a warm start's folder records: its summary less the wall-clock numbers (those go to
    the metrics file) and the progress-bar switch (it changes no weight), so the same inputs give
    the same bytes and DVC the same hash."""
    out = {k: v for k, v in summary.items() if not k.endswith(("_seconds", "_per_s"))}
    for key in ("warmstart",):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "progress"}
    return out


REBUILD = "dvc unfreeze warmstart_vision && dvc repro warmstart_vision && dvc freeze warmstart_vision"


def check_vision_init(directory: str | Path, world: WorldConfig, vision: VisionConfig) -> None:
    """Refuse a warm start made for another world or ViT: the stage is frozen (its committed
    weights are reused whatever the params say), so a run that changes ``generate.world`` or
    ``model.vision`` must rebuild it first. Raises ``ValueError`` naming the differing keys."""
    card_path = Path(directory) / CARD
    if not card_path.is_file():
        return  # load_vision_init names the missing file
    card = json.loads(card_path.read_text())
    want = {"world": asdict(world), "vision": asdict(vision)}
    diff = [f"{part}.{k}: warm start {card.get(part, {}).get(k)!r}, this run {v!r}"
            for part, d in want.items() for k, v in d.items() if card.get(part, {}).get(k, v) != v]
    if diff:
        raise ValueError(f"{card_path}: the warm-start ViT was trained for another world or model ("
                         + "; ".join(diff) + f"). Rebuild it for this run's params: {REBUILD}")


def load_vision_init(model, directory: str | Path) -> dict[str, Any]:
    """Copy a warm-start ViT (``directory`` from :func:`train_vision`) into ``model.visual_encoder``
    and, where the model has one, its momentum copy. Raises naming the file when the ViT shapes
    differ from the model's (the warm start was made for another ``model.vision``)."""
    from ..checkpoint import load_weights

    directory = Path(directory)
    card_path, weights = directory / CARD, directory / WEIGHTS
    for p in (card_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no vision warm start here; the warmstart_vision stage's weights are "
                                    f"committed to git (git checkout -- {directory}) or rebuilt by: {REBUILD}; "
                                    "or set warmstart_vision.enabled: false")
    card = json.loads(card_path.read_text())
    state = load_file(str(weights))
    try:
        for name in ("visual_encoder", "visual_encoder_m"):
            if hasattr(model, name):
                load_weights(getattr(model, name), state, strict=True)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{weights}: the warm-start ViT does not fit this model ({e}); "
                         f"re-run warmstart_vision after changing model.preset or model.vision: {REBUILD}") from e
    return card
