"""Small model configs and inputs shared by the model tests."""

from __future__ import annotations

import torch

from blip.model.config import BlipConfig, TextConfig, VisionConfig


def micro_config(**overrides) -> BlipConfig:
    """A few-thousand-parameter BLIP whose special ids fit a 100-token vocabulary."""
    cfg = BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=5,
            enc_token_id=6,
        ),
        embed_dim=16,
        queue_size=24,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every LayerNorm and bias non-trivial values, so a swapped or dropped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def text_inputs(batch: int, length: int, vocab: int = 100, seed: int = 0, cls: int = 2, sep: int = 3):
    """Random ``[CLS] ... [SEP]`` ids, right-padded to ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    ids[:, 0] = cls
    for b in range(batch):
        n = length - (b % 3)  # some rows shorter
        ids[b, n - 1] = sep
        ids[b, n:] = 0
        mask[b, n:] = 0
    return ids, mask


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": 10, "big": 22}


def toy_pairs(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``n`` normalised images of two coloured shapes (left, right) on grey, with captions.

    Deliberately simpler than the project's generated world: it only has to be learnable in
    a few dozen steps so a smoke test can see every loss fall, yet varied enough (~1300
    distinct captions) that in-batch duplicates do not cap the contrastive loss.
    """
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    imgs, caps = [], []
    for _ in range(n):
        im = Image.new("RGB", (size, size), (128, 128, 128))
        d = ImageDraw.Draw(im)
        words = []
        for side in ("left", "right"):
            colour, shape, sz = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))
            cx, cy, r = (size // 4 if side == "left" else 3 * size // 4), size // 2, SIZES[sz] * size // 64
            box = (cx - r // 2 - 2, cy - r, cx + r // 2 + 2, cy + r)
            if shape == "square":
                d.rectangle(box, fill=COLOURS[colour])
            elif shape == "circle":
                d.ellipse(box, fill=COLOURS[colour])
            else:
                d.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=COLOURS[colour])
            words.append(f"a {sz} {colour} {shape}")
        imgs.append(torch.tensor(list(im.getdata()), dtype=torch.float32).view(size, size, 3).permute(2, 0, 1))
        caps.append(f"{words[0]} left of {words[1]}")
    x = torch.stack(imgs) / 255.0
    return (x - 0.5) / 0.25, caps


def micro_preset(tokenizer) -> BlipConfig:
    """The ``tiny`` preset shrunk to one 32-wide layer per tower and 32 px images, for a trained
    tokenizer's vocabulary and special ids (checkpoint and tracking tests)."""
    from blip.model.config import load_preset

    return load_preset(
        "tiny", vision={"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        text={**tokenizer.special_ids, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 40},
        embed_dim=16, queue_size=8,
    )
