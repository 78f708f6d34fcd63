"""BLIP's ``RandomAugment(2, 5, [...])`` rewritten on PIL (the original works on numpy via cv2).

Per image: draw ``n`` ops uniformly (with replacement) from the list; apply each with
probability 0.5 at magnitude ``m`` of 10. Argument scaling follows the original:

- Brightness/Sharpness factor = m/10 * 1.8 + 0.1 (at BLIP's m=5 that is 1.0: both are
  identity ops in BLIP's own pipeline, a quirk we keep rather than silently "fix");
- ShearX/Y = m/10 * 0.3, random sign;  Rotate = m/10 * 30 degrees, random sign;
- TranslateX/Y = m/10 * 10 px at BLIP's 384 px, which we scale with the image side
  (10/384 of it), so the relative shift is the same at 64 px;
- fill value (128, 128, 128) for pixels moved in from outside.

Colour-changing ops (Color, Solarize, Posterize, Invert) are not in BLIP's list, and that matters
here: colour words are in the captions.
"""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)
MAX_LEVEL = 10.0
BLIP_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _signed(rng: random.Random, v: float) -> float:
    return -v if rng.random() > 0.5 else v


def apply_op(img: Image.Image, name: str, m: float, rng: random.Random) -> Image.Image:
    """Apply op ``name`` at magnitude ``m`` (0..10) to an RGB image."""
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(m / MAX_LEVEL * 1.8 + 0.1)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(m / MAX_LEVEL * 1.8 + 0.1)
    if name in ("ShearX", "ShearY"):
        s = _signed(rng, m / MAX_LEVEL * 0.3)
        coeffs = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL)
    if name in ("TranslateX", "TranslateY"):
        px = _signed(rng, m / MAX_LEVEL * 10.0 * img.size[0] / 384.0)
        coeffs = (1, 0, px, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, px)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL)
    if name == "Rotate":
        return img.rotate(_signed(rng, m / MAX_LEVEL * 30.0), Image.Resampling.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown augmentation op {name!r}; known: {BLIP_OPS}")


class RandomAugment:
    """``RandomAugment(n=2, m=5, ops=BLIP_OPS)`` as in BLIP's train transform."""

    def __init__(self, n: int = 2, m: float = 5, ops: tuple[str, ...] = BLIP_OPS, p: float = 0.5):
        self.n, self.m, self.ops, self.p = n, m, tuple(ops), p

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.n):
            name = self.ops[rng.randrange(len(self.ops))]
            if rng.random() > self.p:
                continue
            img = apply_op(img, name, self.m, rng)
        return img
