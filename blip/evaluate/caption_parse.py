"""Read a caption of the generated world back into what it claims: groups, position or relation,
background. The parsing half of the caption checker (``caption_check.py``).

The grammar is ``blip.data.grammar`` read backwards, built from its own tables (``SHAPE_WORDS``,
``COLOUR_WORDS``, ``SIZE_WORDS``, ``COUNT_WORDS``, ``POSITION_WORDS``, ``RELATION_WORDS``,
``BACKGROUND_WORDS``, ``SINGLE_FRAMES``/``PAIR_FRAMES``, ``WEB_PREFIXES``/``WEB_SUFFIXES``), so a
word added there is read here. Every sentence ``describe()`` writes parses, also after
``web_style()`` and after ``pre_caption`` (what the filter's score tables hold).

What a model may get wrong without changing what the caption *claims* is tolerated: case, extra
spaces, a trailing period, a missing comma, "a"/"an", "is"/"are" and singular/plural nouns that
disagree with the count word (the count word decides). What changes the claim or makes it
unreadable is not: a repeated word, an unknown word, two positions, a back-reference ("the
circle") to a shape the caption did not name — all give ``None`` (the checker's ``unparseable``).
A sentence with two readings that claim different things is ``None`` too (the grammar has none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from ..data.grammar import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    POSITION_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    WEB_PREFIXES,
    WEB_SUFFIXES,
)
from ..data.world import ALL_COLOURS


@dataclass(frozen=True)
class CaptionGroup:
    """One group as a caption states it; ``size`` is ``None`` when the caption does not say it."""

    count: int
    size: str | None
    colour: str
    shape: str


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption claims, in the scene's own frame (``blip.data.world.Scene``).

    One group: ``position`` (a ``POSITIONS`` name, or ``None`` when unsaid), ``relation`` None.
    Two groups: ``relation`` is ``"left_of"`` or ``"above"`` with ``groups[0]`` left of / above
    ``groups[1]`` — "B right of A" and "B below A" are stored as A left of / above B.
    ``background``: a ``BACKGROUND_WORDS`` name or ``None`` when unsaid.
    """

    groups: tuple[CaptionGroup, ...]
    position: str | None = None
    relation: str | None = None
    background: str | None = None


def _tokens(phrase: str) -> tuple[str, ...]:
    return tuple(phrase.replace(",", " , ").split())


def _table(pairs) -> dict[tuple[str, ...], object]:
    out: dict[tuple[str, ...], object] = {}
    for phrase, value in pairs:
        out[_tokens(phrase)] = value
    return out


_COUNT = _table((w, n) for n, words in COUNT_WORDS.items() for w in words + (("an",) if n == 1 else ()))
_SIZE = _table((w, s) for s, words in SIZE_WORDS.items() for w in words)
_COLOUR = _table([(c, c) for c in ALL_COLOURS] + [(w, c) for c, words in COLOUR_WORDS.items() for w in words])
_SHAPE = _table((w, s) for s, forms in SHAPE_WORDS.items() for form in forms for w in form)  # either number
_POSITION = _table((w, p) for p, words in POSITION_WORDS.items() for w in words)
_RELATION = _table((w, (rel, backward)) for rel, sides in RELATION_WORDS.items()
                   for backward, words in enumerate(sides) for w in words)
_BACKGROUND = _table((w, b) for b, words in BACKGROUND_WORDS.items() for w in words)
_PREFIXES = ((), ("there", "is"), ("there", "are"), ("a", "picture", "of"), ("an", "image", "with"))

# BLIP's pre_caption turns these into spaces (blip.data.text), so web texts and synthetic captions
# lose them; a raw caption loses them here the same way.
_PUNCT = re.compile(r"[.!\"()*#:;~]")
_WEB_PREFIXES = sorted({_tokens(_PUNCT.sub(" ", p.lower())) for p in WEB_PREFIXES}, key=len, reverse=True)
_WEB_SUFFIXES = sorted({_tokens(_PUNCT.sub(" ", s.lower()).replace("-", " - ").replace("|", " | "))
                        for s in WEB_SUFFIXES}, key=len, reverse=True)


def normalise(text: str) -> tuple[str, ...]:
    """Lower-cased tokens with the web decorations (one prefix, one suffix) taken off; a comma is
    a token of its own and "medium - sized" (as a WordPiece decoder spaces it) is one word."""
    t = _PUNCT.sub(" ", text.lower()).replace(",", " , ").replace("-", " - ").replace("|", " | ")
    toks = tuple(t.split())
    for p in _WEB_PREFIXES:
        if p and toks[: len(p)] == p:
            toks = toks[len(p):]
            break
    for s in _WEB_SUFFIXES:
        if s and toks[-len(s):] == s and len(toks) > len(s):
            toks = toks[: -len(s)]
            break
    out: list[str] = []
    for tok in toks:
        if tok == "sized" and out[-2:] == ["medium", "-"]:
            out[-2:] = ["medium-sized"]
        else:
            out.append(tok)
    return tuple(out)


Parse = Iterator[tuple[object, int]]  # (value, index after it), every way the tokens allow


def _phrase(toks, i: int, table) -> Parse:
    for phrase, value in table.items():
        if toks[i: i + len(phrase)] == phrase:
            yield value, i + len(phrase)


def _word(toks, i: int, *words: str) -> Iterator[int]:
    if toks[i: i + len(words)] == words:
        yield i + len(words)


def _optional(parses: Parse, i: int) -> Parse:
    yield None, i
    yield from parses


def _noun_phrase(toks, i: int) -> Parse:
    """count [size] colour shape, e.g. "a pair of big grey discs"."""
    for count, j in _phrase(toks, i, _COUNT):
        for size, k in _optional(_phrase(toks, j, _SIZE), j):
            for colour, m in _phrase(toks, k, _COLOUR):
                for shape, n in _phrase(toks, m, _SHAPE):
                    yield CaptionGroup(count, size, colour, shape), n


def _short(toks, i: int) -> Parse:
    """"the circle" / "the discs": a back-reference to a named group, by shape."""
    for j in _word(toks, i, "the"):
        yield from _phrase(toks, j, _SHAPE)


def _comma(toks, i: int) -> Iterator[int]:
    yield i  # a model may leave the comma out; the claim is the same
    yield from _word(toks, i, ",")


def _single(toks, i: int) -> Parse:
    """"{np}", "{np} {pos}", "{np} placed {pos}", "{pos} , {np}" -> (group, position)."""
    for g, j in _noun_phrase(toks, i):
        yield (g, None), j
        for k in (j, *_word(toks, j, "placed")):
            for pos, m in _phrase(toks, k, _POSITION):
                yield (g, pos), m
    for pos, j in _phrase(toks, i, _POSITION):
        for k in _comma(toks, j):
            for g, m in _noun_phrase(toks, k):
                yield (g, pos), m


def _ordered(a: CaptionGroup, b: CaptionGroup, rel, subject: int, obj: int):
    """The two groups in the scene's frame from "{subject} {rel} {obj}" (``rel``: (kind, backward))."""
    kind, backward = rel
    pair = (a, b)
    first, second = (obj, subject) if backward else (subject, obj)
    return (pair[first], pair[second]), kind


def _pair(toks, i: int) -> Parse:
    """"{a} {rel} {b}" and "{a} and {b} , {a_short} {rel} {b_short}" -> (groups, relation)."""
    for a, j in _noun_phrase(toks, i):
        for rel, k in _phrase(toks, j, _RELATION):
            for b, m in _noun_phrase(toks, k):
                yield _ordered(a, b, rel, 0, 1), m
        for k in _word(toks, j, "and"):
            for b, m in _noun_phrase(toks, k):
                for n in _comma(toks, m):
                    for sa, p in _short(toks, n):
                        for rel, q in _phrase(toks, p, _RELATION):
                            for sb, r in _short(toks, q):
                                refs = _references((a, b), sa, sb)
                                if refs is not None:
                                    yield _ordered(a, b, rel, *refs), r


def _references(groups, sa: str, sb: str) -> tuple[int, int] | None:
    """Which named groups "the {sa} ... the {sb}" refer to: in naming order when that fits (two
    groups of one shape, told apart by colour, can only be referred to in order), else swapped."""
    for x, y in ((0, 1), (1, 0)):
        if groups[x].shape == sa and groups[y].shape == sb:
            return x, y
    return None


def _sentences(toks) -> Iterator[ParsedCaption]:
    for prefix in _PREFIXES:
        for i in _word(toks, 0, *prefix):
            bodies = [(ParsedCaption((g,), position=pos), j) for (g, pos), j in _single(toks, i)]
            bodies += [(ParsedCaption(groups, relation=rel), j) for (groups, rel), j in _pair(toks, i)]
            for body, j in bodies:
                for k in (j, *_word(toks, j, "in", "the", "image")):
                    for bg, m in _optional(_phrase(toks, k, _BACKGROUND), k):
                        if m == len(toks):
                            yield ParsedCaption(body.groups, body.position, body.relation, bg)


def parse_caption(text: str) -> ParsedCaption | None:
    """What ``text`` claims about its image, or ``None`` when it is not a sentence of the world's
    grammar (module docstring: what is tolerated and what is not)."""
    readings = set(_sentences(normalise(text)))
    return readings.pop() if len(readings) == 1 else None
