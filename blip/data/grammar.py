"""Captions from scenes: a small grammar with paraphrase variety.

Variety comes from synonyms (disc/circle, big/large, gray/grey), word order (position first or
last, "there is ..."), optional detail (size, background) and, for two groups, which group the
sentence starts from ("A left of B" = "B right of A"). Count, colour and shape are always said,
so a caption always pins down what is in the image and retrieval has to bind several attributes.

``describe(scene, rng)`` consumes the generator in an order that does not depend on the
attribute *values*, so describing a perturbed scene with a copy of the same generator gives the
same sentence frame with only the perturbed words changed (this is how ``noise.py`` makes
"one wrong attribute" captions).
"""

from __future__ import annotations

import re

import numpy as np

from .world import (
    ALL_SHAPES,
    TRAIN_BACKGROUNDS,
    ZEROSHOT_BACKGROUNDS,
    Group,
    Scene,
    WorldConfig,
)

SHAPE_WORDS = {  # (singular, plural) paraphrases
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "ring": (("ring", "rings"), ("donut", "donuts")),
}
COLOUR_WORDS = {"grey": ("grey", "gray"), "purple": ("purple", "violet")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized", "medium"), "large": ("large", "big")}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
POSITION_WORDS = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the center"),
    "top left": ("in the top left corner", "at the upper left", "in the top left"),
    "top right": ("in the top right corner", "at the upper right", "in the top right"),
    "bottom left": ("in the bottom left corner", "at the lower left", "in the bottom left"),
    "bottom right": ("in the bottom right corner", "at the lower right", "in the bottom right"),
}
# (forward: groups[0] REL groups[1], backward: groups[1] REL groups[0])
RELATION_WORDS = {
    "left_of": (("to the left of", "left of", "on the left of"), ("to the right of", "right of", "on the right of")),
    "above": (("above", "over", "on top of"), ("below", "under", "beneath")),
}
BACKGROUND_WORDS = {
    "plain": ("on a plain background", "against a plain backdrop"),
    "striped": ("on a striped background", "over stripes"),
    "checkered": ("on a checkered background", "on a checkerboard"),
    "dotted": ("on a dotted background", "on a polka dot background"),
    "gradient": ("on a gradient background", "over a smooth gradient"),
    "speckled": ("on a speckled background", "on a noisy background"),
    "grid": ("on a grid background", "over a grid"),
    "wavy": ("on a wavy background", "over wavy lines"),
    "brick": ("on a brick background", "against a brick wall"),
    "zigzag": ("on a zigzag background", "over zigzag lines"),
}
SINGLE_FRAMES = (
    "{np} {pos}",
    "{pos} , {np}",
    "there {be} {np} {pos}",
    "a picture of {np} {pos}",
    "an image with {np} {pos}",
    "{np} placed {pos}",
)
PAIR_FRAMES = (
    "{a} {rel} {b}",
    "there {be} {a} {rel} {b}",
    "a picture of {a} {rel} {b}",
    "{a} {rel} {b} in the image",
    "{a} and {b} , {a_short} {rel} {b_short}",
)
WEB_PREFIXES = ("photo of ", "image of ", "stock photo : ", "picture : ")
WEB_SUFFIXES = (" - stock image", " | free download", " ( hd )", " - illustration")


def _choose(rng: np.random.Generator, options):
    # Exactly one double per choice whatever len(options) is (integers() may draw more or none),
    # so perturbed scenes keep the same sentence frame.
    return options[int(rng.random() * len(options))]


def _article(phrase: str) -> str:
    if phrase.startswith("a ") and phrase[2:3] in "aeiou":
        return "an " + phrase[2:]
    return phrase


def noun_phrase(g: Group, rng: np.random.Generator) -> str:
    """e.g. "two small red discs". Draws the same number of values whatever the group is."""
    count_word = _choose(rng, COUNT_WORDS[g.count])
    size_word = _choose(rng, SIZE_WORDS[g.size])
    # medium is said rarely: people name sizes that stand out
    say_size = rng.random() < (0.25 if g.size == "medium" else 0.6)
    colour_word = _choose(rng, COLOUR_WORDS.get(g.colour, (g.colour,)))
    noun = _choose(rng, SHAPE_WORDS[g.shape])[0 if g.count == 1 else 1]
    words = [count_word] + ([size_word] if say_size else []) + [colour_word, noun]
    return _article(" ".join(words))


def short_noun(g: Group) -> str:
    """"the circle" / "the circles": used when a caption refers back to a group."""
    return "the " + SHAPE_WORDS[g.shape][0][0 if g.count == 1 else 1]


def describe(scene: Scene, rng: np.random.Generator, say_position_p: float = 0.85, say_background_p: float = 0.35) -> str:
    """One human-style caption of ``scene`` (lower case, no final period)."""
    say_bg = rng.random() < say_background_p
    bg = _choose(rng, BACKGROUND_WORDS[scene.background])
    if len(scene.groups) == 1:
        g = scene.groups[0]
        say_pos = rng.random() < say_position_p
        frame = _choose(rng, SINGLE_FRAMES)
        np_ = noun_phrase(g, rng)
        pos = _choose(rng, POSITION_WORDS[scene.layout])
        if not say_pos:
            frame = frame.replace(" placed {pos}", "").replace(" {pos}", "").replace("{pos} , ", "")
        text = frame.format(np=np_, pos=pos, be="is" if g.count == 1 else "are")
    else:
        backward = rng.random() < 0.5
        frame = _choose(rng, PAIR_FRAMES)
        nps = [noun_phrase(g, rng) for g in scene.groups]
        rel = _choose(rng, RELATION_WORDS[scene.layout][int(backward)])
        first, second = (1, 0) if backward else (0, 1)
        g0 = scene.groups[first]
        text = frame.format(
            a=nps[first], b=nps[second], rel=rel,
            a_short=short_noun(g0), b_short=short_noun(scene.groups[second]),
            be="is" if g0.count == 1 else "are",
        )
    if say_bg:
        text = f"{text} {bg}"
    return text.replace(" , ", ", ")


def web_style(text: str, rng: np.random.Generator) -> str:
    """Make a clean caption look like alt-text: sometimes a prefix, suffix or Title Case."""
    r = rng.random()
    prefix = _choose(rng, WEB_PREFIXES)
    if r < 0.12 and not text.startswith(("a picture", "an image")):
        text = prefix + text
    elif r < 0.22:
        text = text + _choose(rng, WEB_SUFFIXES)
    if rng.random() < 0.2:
        text = text.title()
    elif rng.random() < 0.3:
        text = text[:1].upper() + text[1:]
    return text


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word the grammar (and the web decorations) can produce for ``cfg``, sorted.

    Noise texts (file names, spam) add more; they are web junk by design, not part of the world.
    """
    from .world import ALL_COLOURS

    words: set[str] = set()

    def add(s: str) -> None:
        words.update(w for w in s.replace(",", " ").split() if w)

    for shape in ALL_SHAPES[: cfg.n_shapes]:
        for sg, pl in SHAPE_WORDS[shape]:
            add(sg), add(pl)
    for colour in list(ALL_COLOURS)[: cfg.n_colours]:
        for w in COLOUR_WORDS.get(colour, (colour,)):
            add(w)
    for table in (SIZE_WORDS, COUNT_WORDS, POSITION_WORDS, BACKGROUND_WORDS):
        for options in table.values():
            for w in options:
                add(w)
    for fwd, bwd in RELATION_WORDS.values():
        for w in fwd + bwd:
            add(w)
    for frame in SINGLE_FRAMES + PAIR_FRAMES + WEB_PREFIXES + WEB_SUFFIXES:
        add(re.sub(r"\{[^}]*\}", " ", frame))
    words.update({"the", "an", "is", "are"})
    assert set(TRAIN_BACKGROUNDS + ZEROSHOT_BACKGROUNDS) <= set(BACKGROUND_WORDS)
    return sorted(w.lower() for w in words if any(c.isalpha() for c in w))
