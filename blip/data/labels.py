"""The ONLY reader of web noise labels. For evaluation and pictures, never for training/filtering.

The generator writes ``"noise": kind | null`` into every web sample's ``.json``. CapFilt's whole
point is to find noisy pairs without being told, so the loader (training, captioning, filtering
paths) drops the field: it copies only whitelisted fields out of the ``.json``. Code that needs
the truth (filter precision/recall, the contact sheet, the gallery, and the ``oracle`` ceiling of
``assemble`` — an evaluation instrument that keeps the web texts the labels call clean) calls
``noise_labels`` here, by name, so a reviewer can grep for every use.
``tests/test_data_noise_isolation.py`` checks both sides and lists every caller.
"""

from __future__ import annotations

import json

from .shards import resolve_shards
from .tario import RawSample, iter_shard_samples

NOISE_FIELD = "noise"


def noise_labels(shards, required: bool = False) -> dict[str, str | None]:
    """``key -> noise kind`` (``None`` for a clean pair) for every sample of ``shards``.

    ``shards``: anything ``resolve_shards`` accepts (folder, tar path, brace pattern, list).
    Keys are unique within one shard set (img2dataset keys); pass one split at a time.
    Samples without a noise field (e.g. real img2dataset data) map to ``None``; unreadable
    samples are absent. ``required``: a readable ``.json`` without the field raises
    ``ValueError`` naming the shard and the sample instead (nobody labelled it: "clean" would be a
    guess).
    """
    out: dict[str, str | None] = {}
    for url in resolve_shards(shards):
        for s in iter_shard_samples(url, want={"json"}):
            if not isinstance(s, RawSample) or s.error is not None or "json" not in s.fields:
                continue
            try:
                meta = json.loads(s.fields["json"])
            except ValueError:
                continue
            if not isinstance(meta, dict):
                continue
            if required and NOISE_FIELD not in meta:
                raise ValueError(f"{url}: sample {s.key} has no {NOISE_FIELD!r} label in its .json (not data the "
                                 "generator wrote, e.g. a real img2dataset download)")
            out[s.key] = meta.get(NOISE_FIELD)
    return out
