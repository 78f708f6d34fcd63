"""Does a model's ViT still see shape, colour and count? A linear probe of its image tokens.

For each checkpoint (the shipped warm start ``models/warmstart_vision``, or any blip-bootstrap
model directory: pre-trained, captioner, filter) the ViT encodes labelled images of the world
(indices far beyond the warm start's training set), and a linear classifier per attribute group
is fitted on the first ``--train`` images and scored on the rest: exact-match accuracy and mean
ROC-AUC per group (as ``warmstart.held_out_metrics``), on the [CLS] token and on the mean of the
patch tokens (what the text side's cross-attention reads). If pre-training loses what the warm
start knew, the probe says so (docs/recipe.md §0.8).

    python bench/probe_vit_shape.py models/warmstart_vision /path/models/pretrain /path/models/captioner
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blip import params as P  # noqa: E402
from blip.data.render import render  # noqa: E402
from blip.data.transforms import normalize  # noqa: E402
from blip.data.world import TRAIN_BACKGROUNDS, sample_rngs, sample_scene  # noqa: E402
from blip.train.warmstart import label_names, scene_labels  # noqa: E402

OFFSET = 1_000_000  # labelled-split indices no warm start has seen


def labelled(n: int, seed: int, world) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    names = label_names(world)
    images = torch.empty(n, 3, world.image_size, world.image_size, dtype=torch.uint8)
    labels = np.empty((n, len(names)), np.float32)
    for i in range(n):
        rngs = sample_rngs(seed, "labelled", OFFSET + i)
        scene = sample_scene(rngs[0], world, TRAIN_BACKGROUNDS)
        images[i] = torch.from_numpy(np.array(render(scene, rngs[1], world))).permute(2, 0, 1)
        labels[i] = scene_labels(scene, names)
    return images, torch.from_numpy(labels), names


def load_vit(path: Path, vision_cfg):
    """The ViT of a warm-start folder (``vision.safetensors``) or of any model checkpoint."""
    from blip.checkpoint import load_model
    from blip.model.vit import VisionEncoder
    from blip.train.warmstart import load_vision_init

    if (path / "vision.safetensors").is_file():
        holder = torch.nn.Module()
        holder.visual_encoder = VisionEncoder(vision_cfg)
        load_vision_init(holder, path)
        return holder.visual_encoder
    return load_model(path).visual_encoder


@torch.no_grad()
def features(vit, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vit.eval()
    toks = torch.cat([vit(normalize(images[i:i + 256])) for i in range(0, len(images), 256)]).float()
    return toks[:, 0], toks[:, 1:].mean(1)


def probe(x: torch.Tensor, y: torch.Tensor, names: list[str], n_train: int, steps: int = 300) -> dict:
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(head(x[:n_train]), y[:n_train]).backward()
        opt.step()
    return _metrics(head, x[n_train:], y[n_train:], names)


def _metrics(head, x, y, names) -> dict:
    from blip.evaluate.filter_quality import roc_auc
    from blip.train.warmstart import label_groups

    with torch.no_grad():
        logits = head(x)
    out = {}
    for group, idx in label_groups(names).items():
        if group not in ("shape", "colour", "objects", "size", "layout"):
            continue
        out[f"{group}/exact"] = round(float(((logits[:, idx] > 0).float() == y[:, idx]).all(1).float().mean()), 3)
        aucs = [roc_auc(logits[:, j].numpy(), y[:, j].numpy() > 0) for j in idx if 0 < y[:, j].sum() < len(y)]
        out[f"{group}/auc"] = round(float(np.mean(aucs)), 4)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--out", default="bench/probe_vit_shape.jsonl")
    args = ap.parse_args(argv)
    prm = P.load(args.params)
    world = prm.generate.world
    images, labels, names = labelled(args.images, prm.generate.seed, world)
    vision_cfg = prm.model.config({}).vision
    for m in args.models:
        vit = load_vit(Path(m), vision_cfg)
        cls, mean = features(vit, images)
        row = {"model": m, "cls": probe(cls, labels, names, args.train),
               "mean_patch": probe(mean, labels, names, args.train)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
