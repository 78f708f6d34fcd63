"""The caption corpus for building the tokenizer (web + human captions)."""

from __future__ import annotations

import json
from typing import Iterator

from .shards import resolve_shards
from .tario import RawSample, iter_shard_samples
from .text import decode_caption, pre_caption

CORPUS_MAX_WORDS = 10_000  # cleaning only; no truncation worth the name


def caption_corpus(shards, clean: bool = True, all_captions: bool = True) -> Iterator[str]:
    """Yield every caption of ``shards`` (any spec ``resolve_shards`` accepts, e.g.
    ``["data/generated/web", "data/generated/human"]``), in shard order.

    ``clean``: pass each caption through ``pre_caption`` (lower case, BLIP's punctuation rule), as
    the model will see them; empty results are dropped. ``all_captions``: yield every entry of
    ``json["captions"]`` (human data: five per image), else only the ``.txt`` caption.
    Only captions are read (images are skipped over): no labels, no pixels. Damaged samples are
    skipped silently here; the loader is where they are counted.
    """
    for url in resolve_shards(shards):
        for s in iter_shard_samples(url, want={"txt", "json"}):
            if not isinstance(s, RawSample) or s.error is not None:
                continue
            texts: list[str] = []
            if all_captions and "json" in s.fields:
                try:
                    caps = json.loads(s.fields["json"]).get("captions")
                except (ValueError, AttributeError):
                    caps = None
                if isinstance(caps, list):
                    texts = [c for c in caps if isinstance(c, str)]
            if not texts and "txt" in s.fields:
                texts = [decode_caption(s.fields["txt"])[0]]
            for t in texts:
                t = pre_caption(t, CORPUS_MAX_WORDS) if clean else t
                if t:
                    yield t
