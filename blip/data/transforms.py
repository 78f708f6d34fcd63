"""BLIP's image transforms (blip-facts 1.13), on PIL + numpy, with an explicit random generator.

Train: RandomResizedCrop(size, scale=(min_scale, 1), bicubic) -> horizontal flip ->
RandomAugment(2, 5, BLIP ops) -> tensor -> CLIP normalisation. ``min_scale`` is 0.2 for
pre-training and 0.5 for fine-tuning. Eval: Resize((size, size), bicubic) -> tensor -> normalise.

Every random choice comes from the ``random.Random`` passed in, so the loader can make a whole
epoch reproducible from (seed, epoch, rank, worker).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from .randaugment import RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRETRAIN_MIN_SCALE = 0.2
FINETUNE_MIN_SCALE = 0.5

_MEAN_T = torch.tensor(CLIP_MEAN, dtype=torch.float32).reshape(3, 1, 1)
_STD_T = torch.tensor(CLIP_STD, dtype=torch.float32).reshape(3, 1, 1)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W); normalise a whole batch later with ``normalize``."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 CLIP-normalised, same shape. One op per batch, not per image."""
    return (x.float().div_(255.0) - _MEAN_T) / _STD_T


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, H, W) (ToTensor + Normalize)."""
    return normalize(to_uint8(img))


def random_resized_crop_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, width, height) of the crop."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    # fallback: centre crop at the nearest allowed aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


class TrainTransform:
    """``__call__(img, rng) -> (uint8 tensor (3, size, size), flipped: bool)``; ``normalize`` the
    stacked batch.

    ``flipped`` lets the loader swap "left"/"right" in the caption: BLIP flips blindly, which in
    a world whose captions name positions would teach the model that left means right half the
    time (set ``hflip=False`` to turn flipping off instead).
    """

    def __init__(self, image_size: int, min_scale: float = PRETRAIN_MIN_SCALE, hflip: bool = True, randaugment: bool = True):
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale={min_scale}: must be in (0, 1]")
        self.size, self.min_scale, self.hflip = image_size, min_scale, hflip
        self.augment = RandomAugment(2, 5) if randaugment else None

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[torch.Tensor, bool]:
        left, top, cw, ch = random_resized_crop_box(img.width, img.height, rng, scale=(self.min_scale, 1.0))
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        flipped = self.hflip and rng.random() < 0.5
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.augment is not None:
            img = self.augment(img, rng)
        return to_uint8(img), flipped


class EvalTransform:
    """``__call__(img) -> uint8 tensor (3, size, size)``: resize (no crop), bicubic; ``normalize``
    the stacked batch."""

    def __init__(self, image_size: int):
        self.size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_uint8(img.resize((self.size, self.size), Image.Resampling.BICUBIC))
