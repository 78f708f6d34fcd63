"""Realistic corruption of web captions, at a known rate and mix (the writer side of noise).

Kinds, from hard to easy for a filter:

- ``wrong_attribute``: the true caption with one colour, shape, size or position/relation wrong;
- ``wrong_count``: the true caption with one group's count wrong;
- ``unrelated``: the (clean) caption of another web image;
- ``generic``: "image", "photo 2019", "untitled" ...;
- ``filename``: "IMG_0042.jpg", "DSC01234.JPG" ...;
- ``spam``: "buy cheap watches online best price" ...

Which samples are noisy is decided by ``noise_plan`` for the whole split at once (exact counts,
seeded positions), so the realised rate equals the setting up to rounding. The labels are
written into each sample's ``.json`` as ``"noise"`` and read back only by ``labels.noise_labels``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .grammar import describe, web_style
from .world import POSITIONS, SIZES, Group, Scene, WorldConfig

NOISE_KINDS = ("unrelated", "wrong_attribute", "wrong_count", "generic", "filename", "spam")
DEFAULT_NOISE_MIX = {
    "unrelated": 0.25,
    "wrong_attribute": 0.25,
    "wrong_count": 0.15,
    "generic": 0.12,
    "filename": 0.11,
    "spam": 0.12,
}

_GENERIC = ("image", "photo", "picture", "untitled", "img", "my photos", "new picture", "pic",
            "thumbnail", "default image", "no description available", "untitled design", "photo {year}",
            "image {n}", "photo #{n}", "picture {year}", "pic {n}", "{year}")
_FILENAMES = ("IMG_{n4}.jpg", "DSC{n5}.JPG", "image_{n}.png", "photo_{n}.jpeg", "P{n7}.JPG",
              "Screenshot {year}-{mm}-{dd} at {hh}.{mm}.{dd}", "{hex8}.jpg", "IMG-{year}{mm}{dd}-WA{n4}.jpg",
              "scan{n4}.tif", "download ({n}).jpg")
_SPAM = ("buy cheap {item} online best price", "click here for free shipping", "follow us on instagram",
         "limited offer {pct}% off all {item}", "best {item} deals {year}", "subscribe for more",
         "download free hd wallpapers", "{item} for sale cheap", "win a free {item} today",
         "visit our shop for {item}", "hot sale {item} {pct}% discount", "like and share")
_ITEMS = ("watches", "shoes", "phones", "bags", "sunglasses", "jerseys", "laptops", "jewelry")


def validate_mix(mix: dict[str, float]) -> dict[str, float]:
    unknown = set(mix) - set(NOISE_KINDS)
    if unknown:
        raise ValueError(f"noise mix has unknown kinds {sorted(unknown)}; known kinds: {list(NOISE_KINDS)}")
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise ValueError(f"noise mix weights must be >= 0 and not all zero, got {mix}")
    return {k: v / total for k, v in mix.items() if v > 0}


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    raw = {k: total * w for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], k))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def noise_plan(n: int, rate: float, mix: dict[str, float], seed: int) -> list[str | None]:
    """Noise kind (or None) for each of ``n`` web samples: exactly round(n*rate) noisy ones,
    split across kinds by largest remainder, at positions given by a seeded permutation."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    weights = validate_mix(mix)
    counts = _largest_remainder(round(n * rate), weights)
    kinds: list[str | None] = [k for k in NOISE_KINDS if k in counts for _ in range(counts[k])]
    kinds += [None] * (n - len(kinds))
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7919, n]))).permutation(n)
    plan: list[str | None] = [None] * n
    for slot, idx in enumerate(order):
        plan[int(idx)] = kinds[slot]
    return plan


def _fill(template: str, rng: np.random.Generator) -> str:
    return template.format(
        n=int(rng.integers(1, 300)), n4=f"{int(rng.integers(10000)):04d}", n5=f"{int(rng.integers(100000)):05d}",
        n7=f"{int(rng.integers(10**7)):07d}", year=int(rng.integers(2008, 2024)), mm=f"{int(rng.integers(1, 13)):02d}",
        dd=f"{int(rng.integers(1, 29)):02d}", hh=f"{int(rng.integers(0, 24)):02d}",
        hex8="".join("0123456789abcdef"[int(i)] for i in rng.integers(16, size=8)),
        item=_ITEMS[int(rng.integers(len(_ITEMS)))], pct=int(rng.integers(2, 10)) * 10,
    )


def junk_text(kind: str, rng: np.random.Generator) -> str:
    """A ``generic``, ``filename`` or ``spam`` text."""
    table = {"generic": _GENERIC, "filename": _FILENAMES, "spam": _SPAM}[kind]
    return _fill(table[int(rng.integers(len(table)))], rng)


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def perturb_attribute(scene: Scene, what: str, rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """The scene with one ``what`` (colour, shape, size, layout) changed."""
    gi = int(rng.integers(len(scene.groups)))
    g = scene.groups[gi]
    if what == "layout":
        if len(scene.groups) == 2:  # swap roles: "A left of B" becomes "B left of A"
            return dataclasses.replace(scene, groups=scene.groups[::-1])
        return dataclasses.replace(scene, layout=_other(rng, POSITIONS, scene.layout))
    field_options = {"colour": cfg.colours, "shape": cfg.shapes, "size": SIZES}[what]
    new_g = dataclasses.replace(g, **{what: _other(rng, field_options, getattr(g, what))})
    groups = list(scene.groups)
    groups[gi] = new_g
    return dataclasses.replace(scene, groups=tuple(groups))


def perturb_count(scene: Scene, rng: np.random.Generator) -> Scene:
    gi = int(rng.integers(len(scene.groups)))
    g = scene.groups[gi]
    groups = list(scene.groups)
    groups[gi] = Group(g.shape, g.colour, g.size, _other(rng, (1, 2, 3), g.count))
    return dataclasses.replace(scene, groups=tuple(groups))


def corrupt(
    kind: str,
    scene: Scene,
    clean: str,
    caption_of: Callable[[Scene], str],
    other_caption: Callable[[np.random.Generator], str],
    rng: np.random.Generator,
    cfg: WorldConfig,
) -> str:
    """A noisy caption of ``kind`` for an image showing ``scene`` whose clean caption is ``clean``.

    ``caption_of(scene)`` re-describes a scene with the *same* paraphrase draws as ``clean``, so
    the perturbed caption differs only in the perturbed words; ``other_caption(rng)`` returns the
    clean caption of another web image. The result always differs from ``clean``.
    """
    if kind in ("generic", "filename", "spam"):
        return junk_text(kind, rng)
    if kind == "unrelated":
        for _ in range(20):
            text = other_caption(rng)
            if text != clean:
                return text
    if kind == "wrong_count":
        for _ in range(20):
            text = caption_of(perturb_count(scene, rng))
            if text != clean:
                return text
    if kind == "wrong_attribute":
        # layout is only wrong if the caption says it; retry until the words change
        for _ in range(20):
            what = ("colour", "shape", "size", "layout")[int(rng.integers(4))]
            text = caption_of(perturb_attribute(scene, what, rng, cfg))
            if text != clean:
                return text
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; known kinds: {list(NOISE_KINDS)}")
    raise RuntimeError(f"could not corrupt caption {clean!r} with kind {kind!r} in 20 tries")


def describe_web(scene: Scene, caption_seed_rngs: Callable[[], tuple[np.random.Generator, np.random.Generator]]) -> str:
    """Clean web caption: a grammar caption in alt-text style; ``caption_seed_rngs()`` returns
    fresh (grammar, style) generators, identical on every call."""
    grammar_rng, style_rng = caption_seed_rngs()
    return web_style(describe(scene, grammar_rng), style_rng)
