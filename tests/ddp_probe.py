"""Run under torchrun (2 processes, gloo) or alone: a few pre-training steps on one fixed global
batch, each rank taking its slice. Rank 0 writes the all-reduced losses and final state."""

from __future__ import annotations

import json
import os
import sys

import torch
from helpers_model import micro_config, text_inputs

from blip import dist
from blip.model.blip import BlipPretrain
from blip.train.optim import param_groups


def main(out: str, steps: int = 3) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    world, rank = dist.world_size(), dist.rank()
    torch.manual_seed(0)
    cfg = micro_config(queue_size=32)
    cfg.text.hidden_dropout_prob = cfg.text.attention_probs_dropout_prob = 0.0  # deterministic forward
    model = BlipPretrain(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    B = 8
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = text_inputs(B, 10, seed=2)
    mask[:] = 1  # equal lengths, so per-rank token means average to the global mean
    ids[:, -1] = 3
    rows = slice(rank * B // world, (rank + 1) * B // world)
    history = []
    for step in range(steps):
        torch.manual_seed(100 + step + 1000 * rank)
        losses = ddp(images[rows], ids[rows], mask[rows], alpha=0.4)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
        history.append(dict(zip(losses, dist.all_reduce_mean([float(v.detach()) for v in losses.values()]))))
    if rank == 0:
        state = {
            "history": history,
            "image_queue": model.image_queue[:, : B * steps].tolist(),
            "queue_ptr": int(model.queue_ptr),
            "weight": model.text_decoder.cls.predictions.transform.dense.weight[:4, :4].tolist(),
        }
        with open(out, "w") as f:
            json.dump(state, f)
    if dist.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
