"""Exact duplicates across the ``assemble`` stage's input shards (``assemble.dedup``), and a report
of texts many images share.

``find_duplicates`` streams every input shard once, in the order ``assemble`` processes them
(human shards first, then web), and keys each sample on a 16-byte blake2b digest: of its image
member's bytes (``image``: the first of ``IMAGE_EXTS`` present) or of its ``.json`` ``url``
(``url``). The first occurrence is kept; every later one is a duplicate, dropped by ``assemble``
with all its texts. Only digests are held in memory, never images.

Not deduplicated, but counted: samples without an image member, or (``url`` mode) whose ``.json``
is not valid JSON (``unreadable``); samples without a non-empty string ``url`` (``no_url``). A
damaged shard is read up to its damage; the sample cut there and the tail are ``assemble``'s to
count. Keys must be unique within a shard: a drop is addressed by (shard, key).

``repeated_texts`` reports texts on many images (placeholders, boilerplate); it drops nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from ..data.decode import IMAGE_EXTS
from ..data.shards import is_local, shard_file_name
from ..data.tario import ShardEnd, iter_shard_samples

MODES = ("image", "url", "none")
TOP = 20  # duplicate groups / repeated texts listed in stats.json


def shard_label(url: str) -> str:
    """``.../web/00003.tar`` -> ``web/00003.tar`` (as assemble's provenance names shards)."""
    if not is_local(url):
        return shard_file_name(url)
    return f"{os.path.basename(os.path.dirname(url))}/{os.path.basename(url)}"


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class Duplicates:
    """``drop``: shard url -> {sample key -> the kept original, ``"shard_label/key"``}.
    ``counts``: ``n_samples_read = n_unique + n_duplicates + no_url + unreadable``; ``n_groups``:
    originals with at least one duplicate. ``top``: the largest groups, ``{"key": the original,
    "copies": samples in the group, the original included}``, largest first."""

    mode: str
    drop: dict[str, dict[str, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("n_samples_read", "n_unique", "n_duplicates", "n_groups", "no_url", "unreadable"), 0))
    top: list[dict] = field(default_factory=list)

    def to_stats(self) -> dict:
        """JSON-safe summary for ``stats.json`` (the per-sample drops go to the manifests)."""
        return {"mode": self.mode, **self.counts, "top": [dict(t) for t in self.top]}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"assemble.dedup: unknown mode {mode!r}; allowed: {', '.join(MODES)}")


def find_duplicates(shards: list[str], mode: str) -> Duplicates:
    """Find the later copies of every image (``mode="image"``) or url (``"url"``) in ``shards``,
    read in this order; ``"none"`` reads nothing and finds nothing."""
    _check_mode(mode)
    dups = Duplicates(mode)
    if mode == "none":
        return dups
    repeated = sorted(u for u, n in Counter(shards).items() if n > 1)
    if repeated:
        raise ValueError(f"dedup: shard(s) listed more than once: {repeated}")
    labels = [shard_label(u) for u in shards]
    first: dict[bytes, tuple[int, str]] = {}  # digest -> (shard index, key) of its first occurrence
    group: Counter[tuple[int, str]] = Counter()  # original -> later copies (only duplicated ones)
    c = dups.counts
    want = set(IMAGE_EXTS) | ({"json"} if mode == "url" else set())
    for i, url in enumerate(shards):
        for raw in iter_shard_samples(url, want):
            if isinstance(raw, ShardEnd) or raw.error is not None:
                break  # damage: the cut sample and the unread tail are assemble's to count
            c["n_samples_read"] += 1
            image = next((raw.fields[e] for e in IMAGE_EXTS if e in raw.fields), None)
            if image is None:
                c["unreadable"] += 1
                continue
            if mode == "image":
                d = _digest(image)
            else:
                try:
                    meta = json.loads(raw.fields["json"]) if "json" in raw.fields else {}
                except (ValueError, RecursionError):
                    c["unreadable"] += 1
                    continue
                u = meta.get("url") if isinstance(meta, dict) else None
                if not isinstance(u, str) or not u:
                    c["no_url"] += 1
                    continue
                d = _digest(u.encode("utf-8", "surrogatepass"))  # json may hold lone surrogates
            orig = first.get(d)
            if orig is None:
                first[d] = (i, raw.key)
                c["n_unique"] += 1
                continue
            c["n_duplicates"] += 1
            group[orig] += 1
            dups.drop.setdefault(url, {})[raw.key] = f"{labels[orig[0]]}/{orig[1]}"
    c["n_groups"] = len(group)
    biggest = sorted(group.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    dups.top = [{"key": f"{labels[s]}/{k}", "copies": n + 1} for (s, k), n in biggest]
    return dups


def repeated_texts(texts: Iterable[tuple[str, str]], min_images: int = 3, top: int = TOP) -> dict:
    """Texts (compared after lower-casing and collapsing whitespace; empty ones ignored) that
    ``(image key, text)`` pairs put on at least ``min_images`` distinct images, most frequent
    first (ties: first seen first). ``n_pairs_affected``: distinct (image, text) pairs they make."""
    if min_images < 1 or top < 0:
        raise ValueError(f"repeated_texts: min_images must be >= 1 and top >= 0 (got {min_images}, {top})")
    images: Counter[str] = Counter()
    seen: set[bytes] = set()  # digests of (image, text) pairs already counted
    for key, text in texts:
        t = " ".join(text.lower().split())
        pair = _digest(f"{key}\0{t}".encode("utf-8", "surrogatepass"))
        if t and pair not in seen:
            seen.add(pair)
            images[t] += 1
    rep = sorted(((t, n) for t, n in images.items() if n >= min_images), key=lambda tn: -tn[1])
    return {"min_images": min_images, "n_texts_repeated": len(rep), "n_pairs_affected": sum(n for _, n in rep),
            "top": [{"text": t, "images": n} for t, n in rep[:top]]}
