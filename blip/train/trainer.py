"""The training loop shared by every job: pre-training and the three fine-tunings.

Reads top to bottom: set up (device, process group, model, optimizer, loader), maybe resume,
then epochs of optimizer steps, each of ``grad_accum_steps`` micro-batches, with resumable
checkpoints every ``ckpt_every`` steps and at every epoch end. DDP comes from torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); only rank 0 writes files and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..checkpoint import save_model
from ..data.loader import BlipLoader, LoaderConfig
from ..data.progress import progress_bar
from ..model.config import BlipConfig
from ..tokenizer import BlipTokenizer
from ..track import NullTracker, Tracker, is_main_process
from .config import TrainConfig
from .jobs import build_model, compute_losses
from .optim import lr_at, param_groups, set_lr
from .state import config_hash, load_state, read_state, save_state


def init_distributed(device_name: str) -> None:
    """Join the process group torchrun describes (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")


def weighted_loss(losses: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """What the step minimises: the sum of the job's losses, ITM's weighted by ``itm_weight``
    (the losses it logs stay unweighted, comparable across recipes)."""
    return sum(v * cfg.itm_weight if k == "itm" else v for k, v in losses.items())


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint32)[0])


def train(
    cfg: TrainConfig,
    shards,
    out_dir: str | Path,
    init: str | Path | None = None,
    model_cfg: BlipConfig | None = None,
    tokenizer: BlipTokenizer | None = None,
    tracker: Tracker | None = None,
    resume_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    vision_init: str | Path | None = None,
    text_init: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``cfg.job`` on ``shards``; write the final model (+ tokenizer) to ``out_dir``.

    ``init``: checkpoint to start from (required for fine-tuning); ``vision_init``: a ViT warm
    start (``warmstart.train_vision``) and ``text_init`` a text warm start
    (``warmstart_text.train_text``) for a model trained from scratch. ``resume_dir`` (default
    ``<out_dir>.resume``): where resumable state goes; if it holds state of the same config the
    run continues from it, and it is removed once the final model is written.
    Returns the summary (final losses, steps, throughput, loader counts), also written to
    ``metrics_path`` as JSON when given.
    """
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    resume_dir = Path(resume_dir) if resume_dir is not None else out_dir.with_name(out_dir.name + ".resume")
    init_distributed(cfg.device)
    device = dist.resolve_device(cfg.device)
    world, rank = dist.world_size(), dist.rank()
    main = is_main_process()

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, tok = build_model(cfg, init, model_cfg, tokenizer, vision_init, text_init)
    model.to(device)
    if cfg.vision_lr_scale == 0:
        model.freeze_vision()
    image_cache = None
    if (model.vision_frozen and cfg.vision_cache_mib and cfg.min_scale >= 1.0 and not cfg.augment
            and model.cfg.vision.drop_path_rate == 0):  # every epoch shows the locked ViT the same pixels
        image_cache = model.cache_image_embeds(cfg.vision_cache_mib * 2**20)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.vision_lr_scale, cfg.cross_lr_scale), lr=cfg.lr)

    micro = cfg.batch_size // (world * cfg.grad_accum_steps)
    if micro * world * cfg.grad_accum_steps != cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by world_size ({world}) x grad_accum_steps "
            f"({cfg.grad_accum_steps})"
        )
    loader = BlipLoader(
        shards,
        LoaderConfig(batch_size=micro, image_size=model.cfg.vision.image_size, train=True, min_scale=cfg.min_scale,
                     hflip=cfg.augment, randaugment=cfg.augment, max_words=cfg.max_text_len, seed=cfg.seed,
                     num_workers=cfg.num_workers, max_skipped_fraction=cfg.max_skipped_fraction),
        rank=rank, world_size=world,
    )
    steps_per_epoch = len(loader) // cfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{loader.num_items} training items give no full step of batch_size={cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    chash = config_hash({"train": cfg.to_dict(), "model": model.cfg.to_dict(), "init": str(init),
                         "vision_init": str(vision_init), "text_init": str(text_init), "world": world,
                         "shards": [str(u) for u in loader.urls]})
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    saved = read_state(resume_dir)
    if saved is not None and saved.get("config_hash") == chash:
        position = load_state(resume_dir, model, optimizer)
        if main:
            print(f"resuming {cfg.job} from {resume_dir} at epoch {position['epoch']} step {position['step_in_epoch']}")
    elif saved is not None and main:
        print(f"ignoring {resume_dir}: it was written by a different configuration")
    if main:
        tracker.log_params({f"train.{k}": v for k, v in cfg.to_dict().items()})
        if cfg.grad_accum_steps > 1:
            print(f"gradient accumulation x{cfg.grad_accum_steps}: ITC in-batch negatives come from micro-batches "
                  f"of {micro * world} pairs (all ranks) plus the queue of {model.cfg.queue_size}")

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    bf16 = dist.bf16_enabled(cfg.bf16, device)
    bar = progress_bar(total_steps, main and cfg.progress, cfg.job, unit="step", initial=position["global_step"])

    model.train()
    ema: dict[str, float] = {}
    last: dict[str, float] = {}
    t_start, steps_timed = time.perf_counter(), 0
    global_step = position["global_step"]
    done = global_step >= total_steps
    for epoch in range(position["epoch"], cfg.epochs):
        if done:
            break
        loader.set_epoch(epoch)
        batches = iter(loader)
        start = position["step_in_epoch"] if epoch == position["epoch"] else 0
        for _ in range(start * cfg.grad_accum_steps):  # replay the data position (deterministic per epoch)
            next(batches)
        for step in range(start, steps_per_epoch):
            set_lr(optimizer, lr := lr_at(cfg, epoch, step))
            ramp = cfg.alpha_ramp_epochs * steps_per_epoch
            alpha = cfg.alpha * min(1.0, (epoch * steps_per_epoch + step) / ramp) if ramp > 0 else cfg.alpha
            torch.manual_seed(_step_seed(cfg.seed, global_step, rank))
            sums: dict[str, float] = {}
            for m in range(cfg.grad_accum_steps):
                batch = next(batches)
                sync = contextlib.nullcontext() if (world == 1 or m == cfg.grad_accum_steps - 1) else ddp.no_sync()
                with sync:
                    with dist.train_autocast(device, bf16):
                        losses = compute_losses(cfg, ddp, batch, tok, alpha, device)
                    (weighted_loss(losses, cfg) / cfg.grad_accum_steps).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum_steps
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:  # report the global batch's losses, not rank 0's share
                sums = dict(zip(sums, dist.all_reduce_mean(list(sums.values()), device)))
            global_step += 1
            steps_timed += 1
            sums["loss"] = sum(sums.values())
            last = sums
            for k, v in sums.items():
                ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
            rate = steps_timed * cfg.batch_size / (time.perf_counter() - t_start)
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()} | {"pairs/s": f"{rate:.0f}"}, refresh=False)
            bar.update(1)
            if global_step % cfg.log_every == 0 or global_step == total_steps:
                tracker.log_metrics({**{f"train/{k}": v for k, v in sums.items()}, "train/lr": lr,
                                     "train/alpha": alpha, "train/pairs_per_s": rate}, step=global_step)
            position = {"epoch": epoch, "step_in_epoch": step + 1, "global_step": global_step}
            if step + 1 == steps_per_epoch:
                position = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": global_step}
            if global_step >= total_steps:
                done = True
                break
            if main and (global_step % cfg.ckpt_every == 0 or step + 1 == steps_per_epoch):
                save_state(resume_dir, model, tok, optimizer, position, chash)
    bar.close()

    elapsed = time.perf_counter() - t_start
    summary = {
        "job": cfg.job,
        "steps": global_step,
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "world_size": world,
        "bf16": bf16,
        "final": {k: round(v, 5) for k, v in last.items()},
        "final_ema": {k: round(v, 5) for k, v in ema.items()},
        "pairs_per_s": round(steps_timed * cfg.batch_size / elapsed, 2) if steps_timed else None,
        "seconds": round(elapsed, 2),
        "loader": {k: v for k, v in loader.stats.to_dict().items() if k != "named"},  # names: data_report.json
        "vision_cache": image_cache.stats() if image_cache is not None else None,
    }
    if main:
        save_model(model, out_dir, tokenizer=tok, metadata={"job": cfg.job, "train": cfg.to_dict()})
        # every damaged shard and (up to stats.NAMED_CAP) skipped sample, by name, beside the model
        (out_dir / "data_report.json").write_text(json.dumps(loader.stats.to_dict(), indent=1))
        if metrics_path is not None:
            Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics_path).write_text(json.dumps(summary, indent=2))
        tracker.log_metrics({f"final/{k}": v for k, v in last.items()}, step=global_step)
        shutil.rmtree(resume_dir, ignore_errors=True)
    if dist.is_initialized():
        torch.distributed.barrier()
    return summary
