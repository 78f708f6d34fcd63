"""Draw a ``Scene`` as an RGB image: textured background, then objects, anti-aliased.

Geometry is in fractions of the image side until the last step, so the same scene renders at
any ``image_size``. Randomness (background colours, jitter) comes from the caller's generator.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .world import ALL_COLOURS, SIZE_RADIUS, Group, Scene, WorldConfig

# Anchor (x, y) of a single group by position name, in fractions of the image side.
_ANCHORS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}


def _background_colours(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Two close shades that stay far (RGB distance > 100) from every object colour."""
    objects = np.array([ALL_COLOURS[g.colour] for g in scene.groups], dtype=float)
    for _ in range(100):
        c1 = rng.uniform(35, 220, size=3)
        if np.min(np.linalg.norm(objects - c1, axis=1)) > 100:
            break
    c2 = np.clip(c1 + rng.choice([-1, 1]) * rng.uniform(25, 45), 0, 255)
    return c1, c2


def _texture(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Mask in [0, 1] of shape (n, n): 0 = first shade, 1 = second shade."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    period = rng.uniform(0.08, 0.2)
    phase = rng.uniform(0, 1)
    if kind == "plain":
        return np.zeros((n, n), np.float32)
    if kind == "striped":
        t = rng.integers(3)  # horizontal, vertical, diagonal
        u = y if t == 0 else x if t == 1 else (x + y) / 2
        return (((u / period + phase) % 1) < 0.5).astype(np.float32)
    if kind == "checkered":
        return ((np.floor(x / period + phase) + np.floor(y / period + phase)) % 2).astype(np.float32)
    if kind == "dotted":
        cx, cy = (x / period + phase) % 1 - 0.5, (y / period + phase) % 1 - 0.5
        return ((cx**2 + cy**2) < 0.06).astype(np.float32)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        u = (x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a)
        return np.clip(u + 0.5, 0, 1)
    if kind == "speckled":
        return (rng.random((n, n)) < 0.35).astype(np.float32)
    if kind == "grid":
        gx, gy = (x / period + phase) % 1, (y / period + phase) % 1
        return ((gx < 0.15) | (gy < 0.15)).astype(np.float32)
    if kind == "wavy":
        return (((y + 0.05 * np.sin(2 * math.pi * x / period)) / period + phase) % 1 < 0.5).astype(np.float32)
    if kind == "brick":
        row = np.floor(y / period)
        xs = (x / (2 * period) + 0.5 * (row % 2) + phase) % 1
        return (((y / period) % 1 < 0.12) | (xs < 0.06)).astype(np.float32)
    if kind == "zigzag":
        tri = np.abs((x / period) % 1 - 0.5)
        return (((y + tri * period) / period + phase) % 1 < 0.5).astype(np.float32)
    raise ValueError(f"unknown background texture {kind!r}")


def _polygon(cx: float, cy: float, r: float, k: int, start: float, inner: float | None = None):
    pts = []
    steps = 2 * k if inner is not None else k
    for i in range(steps):
        rad = r if inner is None or i % 2 == 0 else r * inner
        a = start + 2 * math.pi * i / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_object(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    up = -math.pi / 2
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        h = r * 0.85
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy + 0.2 * r, 1.2 * r, 3, up), fill=colour)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, 1.2 * r, 5, up, inner=0.45), fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, cy - 1.2 * r), (cx + 0.8 * r, cy), (cx, cy + 1.2 * r), (cx - 0.8 * r, cy)], fill=colour)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, 1.05 * r, 6, 0.0), fill=colour)
    elif shape == "cross":
        t = 0.33 * r
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(0.4 * r)))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _group_centres(group: Group, anchor: tuple[float, float], vertical: bool, rng,
                   scale: float = 1.0) -> list[tuple[float, float, float]]:
    """(x, y, radius) per object, in fractions: a row (or column) centred on the anchor.

    A row that would not fit the frame (three objects at a large ``object_scale``) shrinks its
    objects until it does, so objects of one group never overlap; at scale 1 every row fits."""
    r = SIZE_RADIUS[group.size] * scale * rng.uniform(0.9, 1.1)
    n = max(group.count, 2)  # two large objects must fit side by side too (two groups, or a pair)
    r = min(r, (0.98 - 0.04 * (n - 1)) / (2 * n))
    step = 2 * r + 0.04
    ax = anchor[0] + rng.uniform(-0.04, 0.04)
    ay = anchor[1] + rng.uniform(-0.04, 0.04)
    out = []
    for i in range(group.count):
        off = (i - (group.count - 1) / 2) * step
        x, y = (ax, ay + off) if vertical else (ax + off, ay)
        x += rng.uniform(-0.015, 0.015)
        y += rng.uniform(-0.015, 0.015)
        out.append((x, y, r))
    return _inside(out)


def _inside(cs: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Keep every object inside the frame: a row that sticks out moves as a whole (so its objects
    keep their gaps); a single coordinate is clamped only where the row cannot move."""
    out = list(cs)
    for axis in (0, 1):
        lo = min(c[axis] - c[2] for c in out) - 0.01
        hi = max(c[axis] + c[2] for c in out) - 0.99
        d = -lo if lo < 0 else -hi if hi > 0 else 0.0
        if d:
            out = [tuple(v + d if i == axis else v for i, v in enumerate(c)) for c in out]
    return [(min(max(x, r + 0.01), 0.99 - r), min(max(y, r + 0.01), 0.99 - r), r) for x, y, r in out]


def layout_objects(scene: Scene, rng: np.random.Generator,
                   scale: float = 1.0) -> list[tuple[Group, float, float, float]]:
    """Place every object: returns (group, x, y, radius) in fractions of the image side;
    ``scale``: the world's ``object_scale``."""
    placed = []
    if len(scene.groups) == 1:
        g = scene.groups[0]
        # left/right groups stack vertically, everything else lines up horizontally
        vertical = scene.layout in ("left", "right")
        placed += [(g, *c) for c in _group_centres(g, _ANCHORS[scene.layout], vertical, rng, scale)]
    else:
        a, b = scene.groups
        if scene.layout == "left_of":
            anchors, vertical = ((0.27, 0.5), (0.73, 0.5)), True
        else:
            anchors, vertical = ((0.5, 0.27), (0.5, 0.73)), False
        ca = _group_centres(a, anchors[0], vertical, rng, scale)
        cb = _group_centres(b, anchors[1], vertical, rng, scale)
        ca, cb = _apart(ca, cb, axis=0 if scene.layout == "left_of" else 1)
        placed += [(a, *c) for c in ca] + [(b, *c) for c in cb]
    return placed


def _apart(ca: list, cb: list, axis: int, gap: float = 0.02) -> tuple[list, list]:
    """Move group a (before, along ``axis``) and group b (after) apart until ``gap`` separates
    them: large objects at a large ``object_scale`` would otherwise overlap (never at scale 1)."""
    a_end = max(c[axis] + c[2] for c in ca)
    b_start = min(c[axis] - c[2] for c in cb)
    shift = (a_end + gap - b_start) / 2
    if shift <= 0:
        return ca, cb

    def moved(cs, d):
        return _inside([tuple(v + d if i == axis else v for i, v in enumerate(c)) for c in cs])

    return moved(ca, -shift), moved(cb, shift)


def render(scene: Scene, rng: np.random.Generator, cfg: WorldConfig) -> Image.Image:
    """RGB image of ``cfg.image_size`` square pixels showing ``scene``."""
    n = cfg.image_size * cfg.supersample
    c1, c2 = _background_colours(rng, scene)
    mask = _texture(rng, scene.background, n)[..., None]
    bg = (c1 * (1 - mask) + c2 * mask).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    for group, x, y, r in layout_objects(scene, rng, cfg.object_scale):
        # small per-object colour jitter: same name, not the same pixel value
        colour = tuple(int(v) for v in np.clip(np.array(ALL_COLOURS[group.colour]) + rng.integers(-12, 13, 3), 0, 255))
        _draw_object(d, group.shape, x * n, y * n, r * n, colour)
    if cfg.supersample > 1:
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX)
    return img
