"""Read one shard for CapFilt: a verdict for every sample, batches of the usable ones.

The verdicts are the loader's own: each raw sample goes through ``blip.data.decode.decode_sample``
(the function ``make_loader`` uses), so a sample is skipped here exactly when the loader would
skip it, with the same reason (``undecodable_image``, ``missing_caption``, ``truncated_tar`` ...).
Unlike the loader, which only counts skips, this reader keeps the key of every skipped sample, so
the caption and filter tables get one row per input sample. Images get the loader's evaluation
transform (resize, CLIP normalisation); texts are cleaned as the pre-training loader cleans them
(``pre_caption``, 30 words). The ``.json`` is read only through the decoder's whitelist.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data.decode import IMAGE_EXTS, DecodeConfig, Sample, decode_sample
from ..data.stats import LoaderStats
from ..data.tario import RawSample, ShardEnd, iter_shard_samples
from ..data.text import PRETRAIN_MAX_WORDS
from ..data.transforms import EvalTransform, normalize
from .records import OK

DUPLICATE_KEY = "duplicate_key"


@dataclass
class Verdict:
    """One input sample: ``status`` is ``"ok"`` (``sample`` set) or the reason it is unusable."""

    raw: RawSample
    sample: Sample | None
    status: str

    @property
    def key(self) -> str:
        return self.raw.key

    def image_member(self) -> tuple[str, bytes]:
        """(extension, bytes) of the image the decoder used."""
        ext = next(e for e in IMAGE_EXTS if e in self.raw.fields)
        return ext, self.raw.fields[ext]


class SampleStream:
    """Iterate a shard's samples in order as :class:`Verdict`; afterwards ``shard_error`` names
    the damage that ended the read (``truncated_tar``, ``corrupt_tar``, ``unreadable_shard``) or
    is None. A key seen twice in one shard gets ``duplicate_key`` the second time (results are
    keyed by sample key)."""

    def __init__(self, url: str, max_words: int = PRETRAIN_MAX_WORDS):
        self.url = url
        self.cfg = DecodeConfig(max_words=max_words)
        self.shard_error: str | None = None
        self.stats = LoaderStats()

    def __iter__(self) -> Iterator[Verdict]:
        seen: set[str] = set()
        for item in iter_shard_samples(self.url):
            if isinstance(item, ShardEnd):
                self.shard_error = item.error
                continue
            if item.key in seen:
                self.stats.skip(DUPLICATE_KEY)
                yield Verdict(item, None, DUPLICATE_KEY)
                continue
            seen.add(item.key)
            one = LoaderStats()  # decode_sample reports a skip reason only through the stats
            sample = decode_sample(item, self.cfg, one)
            self.stats.add(one)
            yield Verdict(item, sample, OK if sample is not None else next(iter(one.skipped)))


@dataclass
class ShardBatch:
    rows: list[int]  # row index (position in the shard) of each item
    keys: list[str]
    images: torch.Tensor  # (B, 3, S, S) float32, CLIP-normalised
    texts: list[str]  # first caption, pre_caption-ed


class ShardReader:
    """Batches of a shard's usable samples; ``keys``/``status``/``texts`` hold one entry per input
    sample once iteration ends (``texts[i]`` is None for unusable samples)."""

    def __init__(self, url: str, image_size: int, batch_size: int, max_words: int = PRETRAIN_MAX_WORDS):
        self.stream = SampleStream(url, max_words)
        self.transform = EvalTransform(image_size)
        self.batch_size = batch_size
        self.keys: list[str] = []
        self.status: list[str] = []
        self.texts: list[str | None] = []

    @property
    def shard_error(self) -> str | None:
        return self.stream.shard_error

    def batches(self) -> Iterator[ShardBatch]:
        items: list[tuple[int, Sample]] = []
        for v in self.stream:
            row = len(self.keys)
            self.keys.append(v.key)
            self.status.append(v.status)
            self.texts.append(v.sample.captions[0] if v.sample is not None else None)
            if v.sample is not None:
                items.append((row, v.sample))
            if len(items) == self.batch_size:
                yield self._batch(items)
                items = []
        if items:
            yield self._batch(items)

    def _batch(self, items: list[tuple[int, Sample]]) -> ShardBatch:
        images = normalize(torch.stack([self.transform(s.image) for _, s in items]))
        return ShardBatch([r for r, _ in items], [s.key for _, s in items], images, [s.captions[0] for _, s in items])
