"""Caption text cleaning and byte decoding, as BLIP does it (``data/utils.py::pre_caption``)."""

from __future__ import annotations

import re

# BLIP replaces exactly these characters with a space (blip-facts 1.13); anything else
# (commas, apostrophes, hyphens) is left for the tokenizer.
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTISPACE = re.compile(r"\s{2,}")

PRETRAIN_MAX_WORDS = 30  # pretrain.yaml and COCO configs
DEFAULT_MAX_WORDS = 50  # pre_caption's own default


def pre_caption(caption: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """Clean a caption exactly as BLIP's ``pre_caption``.

    Lower-cases, replaces ``.!"()*#:;~`` with spaces, collapses runs of two or more
    whitespace characters into one space, strips spaces and keeps at most ``max_words``
    space-separated words. Byte-for-byte the same output as the official function, quirks
    included (a single tab or newline inside the text survives; only spaces are stripped).
    """
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _MULTISPACE.sub(" ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def word_count(caption: str) -> int:
    """Number of words as ``pre_caption`` counts them (split on single spaces after cleaning)."""
    return len(_MULTISPACE.sub(" ", _PUNCT.sub(" ", caption.lower())).strip(" ").split(" "))


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """Decode caption bytes; returns ``(text, was_utf8)``.

    Web alt-text that is not valid UTF-8 is nearly always Windows-1252 (Latin-1 superset), so we
    fall back to cp1252 rather than dropping the pair or filling it with U+FFFD; the few bytes
    cp1252 leaves undefined become U+FFFD. The caller counts ``was_utf8 == False`` as a conversion.
    """
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), False


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(caption: str) -> str:
    """Swap the words "left" and "right": the caption of a horizontally flipped image."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)
