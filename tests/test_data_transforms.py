"""BLIP's transforms: crop scale, flips, RandomAugment ops, eval resize."""

import random

import pytest
import torch
from PIL import Image

from blip.data.randaugment import BLIP_OPS, RandomAugment, apply_op
from blip.data.transforms import (
    EvalTransform,
    TrainTransform,
    normalize,
    random_resized_crop_box,
)


def _img(w=64, h=48):
    img = Image.new("RGB", (w, h), (30, 60, 90))
    img.paste((250, 0, 0), (0, 0, w // 2, h))  # left half red: flips are visible
    return img


def test_crop_box_respects_min_scale_and_bounds():
    rng = random.Random(0)
    for min_scale in (0.2, 0.5):
        areas = []
        for _ in range(300):
            x, y, w, h = random_resized_crop_box(100, 80, rng, scale=(min_scale, 1.0))
            assert 0 <= x and 0 <= y and x + w <= 100 and y + h <= 80
            areas.append(w * h / 8000)
        assert min(areas) >= min_scale * 0.9 and max(areas) <= 1.0
        assert min(areas) < min_scale + 0.1  # the whole range is used


def test_train_transform_shape_determinism_and_flip():
    tf = TrainTransform(32, min_scale=1.0, hflip=True, randaugment=False)
    a, fa = tf(_img(64, 64), random.Random(1))
    b, fb = tf(_img(64, 64), random.Random(1))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b) and fa == fb
    flips = [tf(_img(64, 64), random.Random(s))[1] for s in range(40)]
    assert 5 < sum(flips) < 35
    for s in range(40):
        t, flipped = tf(_img(64, 64), random.Random(s))
        red_left = t[0, :, :8].float().mean() > t[0, :, -8:].float().mean()
        assert red_left != flipped


def test_every_randaugment_op_runs_and_keeps_size():
    img = _img()
    for op in BLIP_OPS:
        out = apply_op(img, op, 5, random.Random(0))
        assert out.size == img.size and out.mode == "RGB"
    # at BLIP's magnitude 5, brightness is the identity (factor 1.0), a quirk we keep
    assert list(apply_op(img, "Brightness", 5, random.Random(0)).getdata()) == list(img.getdata())
    assert list(apply_op(img, "Rotate", 5, random.Random(0)).getdata()) != list(img.getdata())
    ra = RandomAugment(2, 5)
    assert ra(img, random.Random(3)).size == img.size
    with pytest.raises(ValueError, match="unknown augmentation op"):
        apply_op(img, "Solarize", 5, random.Random(0))


def test_eval_transform_resizes_whole_image_and_normalize_is_clip():
    t = EvalTransform(16)(_img(64, 32))
    assert t.shape == (3, 16, 16)
    x = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([(1 - 0.48145466) / 0.26862954, (1 - 0.4578275) / 0.26130258,
                                                       (1 - 0.40821073) / 0.27577711]))
