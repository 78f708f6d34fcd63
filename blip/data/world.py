"""The generated world: its vocabulary, its scenes, and how a scene is sampled.

A scene is one or two *groups*; a group is ``count`` identical objects (shape, colour, size).
One group sits at a named position; two groups stand in a relation (left of / above).
At most three objects per image. Backgrounds are textures; the ``zeroshot`` split draws from
textures never used elsewhere (the distribution shift of the paper's Flickr zero-shot role).

Everything random comes from a ``numpy.random.Generator`` handed in by the caller, so a scene is
a pure function of its seed (see ``sample_rngs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ordered: the first n of each list are used, so n_shapes/n_colours set the vocabulary size.
ALL_SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
ALL_COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 20),
    "purple": (135, 50, 175),
    "pink": (250, 135, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (125, 75, 35),
    "cyan": (40, 205, 215),
    "grey": (128, 128, 128),
}
SIZES = ("small", "medium", "large")
# Object radius as a fraction of the image side; far enough apart to be told apart at 64 px.
SIZE_RADIUS = {"small": 0.07, "medium": 0.11, "large": 0.165}
POSITIONS = ("left", "right", "top", "bottom", "center", "top left", "top right", "bottom left", "bottom right")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("left_of", "above")  # "right of"/"below" are the same scenes described from group B
TRAIN_BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient", "speckled", "grid")
ZEROSHOT_BACKGROUNDS = ("wavy", "brick", "zigzag")


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. ``image_size`` in pixels (the ``tiny`` model preset uses 64).

    ``n_shapes`` (<= 8) and ``n_colours`` (<= 12) choose how many of the shapes and colours are in
    play, and with them the caption vocabulary; ``supersample`` renders at that multiple and
    downsamples for anti-aliased edges; ``object_scale`` multiplies every object's radius
    (``SIZE_RADIUS``: 1.0 draws a small object 9 px across at 64 px, under one 8-px patch and a
    half; scenes stay inside the frame up to 1.5).
    """

    image_size: int = 64
    n_shapes: int = 8
    n_colours: int = 10
    supersample: int = 2
    object_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.n_shapes <= len(ALL_SHAPES):
            raise ValueError(f"n_shapes={self.n_shapes}: must be in 1..{len(ALL_SHAPES)}")
        if not 2 <= self.n_colours <= len(ALL_COLOURS):
            raise ValueError(f"n_colours={self.n_colours}: must be in 2..{len(ALL_COLOURS)}")
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size}: objects need at least 16 px")
        if not 0.5 <= self.object_scale <= 1.5:
            raise ValueError(f"object_scale={self.object_scale}: must be in 0.5..1.5 (larger scenes leave the frame)")

    @property
    def shapes(self) -> tuple[str, ...]:
        return ALL_SHAPES[: self.n_shapes]

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(ALL_COLOURS)[: self.n_colours]


@dataclass(frozen=True)
class Group:
    """``count`` identical objects."""

    shape: str
    colour: str
    size: str
    count: int


@dataclass(frozen=True)
class Scene:
    """One image's content. ``layout`` is a position (one group) or a relation (two groups):
    ``left_of`` means groups[0] is left of groups[1]; ``above`` means groups[0] is above groups[1].
    """

    groups: tuple[Group, ...]
    layout: str
    background: str

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


SPLIT_IDS = {"web": 1, "human": 2, "val": 3, "test": 4, "zeroshot": 5, "labelled": 6, "text": 7}  # the warm starts: ViT, text


def sample_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent (scene, render, caption, style, noise) generators for one sample.

    Seeded from (seed, split, index) only, so any process can make any sample and the output
    does not depend on how the work is split across processes.
    """
    ss = np.random.SeedSequence([seed, SPLIT_IDS[split], index])
    return tuple(np.random.Generator(np.random.PCG64(s)) for s in ss.spawn(5))


def _pick(rng: np.random.Generator, items, p=None):
    return items[int(rng.choice(len(items), p=p))]


def sample_group(rng: np.random.Generator, cfg: WorldConfig, count: int, sizes=SIZES) -> Group:
    return Group(_pick(rng, cfg.shapes), _pick(rng, cfg.colours), _pick(rng, sizes), count)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, backgrounds: tuple[str, ...]) -> Scene:
    """Draw a scene: 55% one group, 45% two groups; never more than three objects.

    Constraints keep every scene drawable at ``image_size``: three objects are never large,
    corner positions hold one object, and two groups differ in shape or colour (else "a red
    circle left of a red circle" would be unlearnable).
    """
    background = _pick(rng, backgrounds)
    if rng.random() < 0.55:
        count = int(_pick(rng, (1, 2, 3), p=(0.5, 0.3, 0.2)))
        group = sample_group(rng, cfg, count, SIZES[:2] if count == 3 else SIZES)
        positions = POSITIONS if count == 1 else tuple(p for p in POSITIONS if p not in CORNERS)
        return Scene((group,), _pick(rng, positions), background)
    counts = _pick(rng, ((1, 1), (1, 2), (2, 1)), p=(0.5, 0.25, 0.25))
    a = sample_group(rng, cfg, counts[0])
    b = sample_group(rng, cfg, counts[1])
    while (b.shape, b.colour) == (a.shape, a.colour):
        b = sample_group(rng, cfg, counts[1])
    return Scene((a, b), _pick(rng, RELATIONS), background)
