"""The shard loader: a webdataset pipeline that yields BLIP batches and accounts for every sample.

Stages, per (rank, DataLoader worker) unit, composed with ``webdataset.DataPipeline``::

    shard source   per-epoch shuffled shard list (seed, epoch[, pass]); split by node, then by
                   worker; training repeats passes until the epoch's batch count is reached
    read           tar -> raw samples grouped by key; damage reported, never raised
    decode         raw -> RGB image + cleaned captions (``decode.py``), or a counted skip
    expand         one item per caption (BLIP's COCO training) or one per image
    shuffle        pair-level buffer (training), so one image's captions do not share a batch
    batch          transforms + stacking; every batch carries the stats delta since the last one

Equal epoch length (no DDP hang at the epoch end): in training every unit yields exactly
``ceil(num_pairs / (batch_size * world_size * workers))`` full batches, repeating its shards
as needed, as open_clip's ``with_epoch`` does. Evaluation reads each sample once, in order.

Exact accounting with workers: counts are made in the worker that reads the sample and travel
inside the batch (``__stats__``); ``BlipLoader`` strips them and sums them into ``stats`` and
``epoch_stats``. A worker's final counts ride on a last, empty item that is never yielded.

If there are fewer shards than ``world_size * workers`` units, every unit reads all shards and
keeps every ``units``-th sample (a sample-level split), so tiny datasets still work.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import DecodeConfig, Sample, decode_sample
from .shards import count_shards, is_local, resolve_shards
from .stats import DataError, LoaderStats
from .tario import RawSample, ShardEnd, iter_shard_samples
from .text import swap_left_right
from .transforms import PRETRAIN_MIN_SCALE, EvalTransform, TrainTransform, normalize

_log = logging.getLogger("blip.data")


@dataclass
class LoaderConfig:
    """How to read a shard set. ``train=True``: random crops/augment, shuffling, repeated to a
    fixed number of full batches; ``train=False``: resize only, one ordered pass, last batch may
    be short.

    ``expand_captions``: one item per caption (default in training, as BLIP's COCO dataset) or
    one per image (``text`` = first caption; all in ``captions``). ``num_samples``: items per
    epoch over all ranks (default: counted from shard metadata: pairs if expanding, else images).
    ``min_scale``: 0.2 for pre-training, 0.5 for fine-tuning (``transforms.py``).
    ``flip_swaps_text``: swap "left"/"right" in captions of flipped images.
    ``shuffle_buffer``: pairs held for shuffling per worker (capped at the worker's share of one
    pass). It holds *decoded* images (a multi-caption image once), so its memory is about
    ``shuffle_buffer * H * W * 3`` bytes per worker: trivial at 64 px, ~0.6 GB for 1000 images at
    512x384; import real data with ``--max-side`` or lower the buffer accordingly.
    ``max_words`` overrides ``decode.max_words``. ``max_skipped_fraction``: the loader raises
    ``DataError`` (naming the top reasons and shards) once more than this share of the samples
    seen were skipped — checked from the first tenth of an epoch on; None: never.
    """

    batch_size: int = 32
    image_size: int = 64
    train: bool = True
    min_scale: float = PRETRAIN_MIN_SCALE
    hflip: bool = True
    flip_swaps_text: bool = True
    randaugment: bool = True
    max_words: int = 30
    expand_captions: bool | None = None  # None: = train
    num_workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 1000
    num_samples: int | None = None
    max_skipped_fraction: float | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.expand_captions is None:
            self.expand_captions = self.train
        self.decode = DecodeConfig(**{**self.decode.__dict__, "max_words": self.max_words})


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the arguments, else torch.distributed if initialised, else (0, 1)."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def epoch_shard_order(urls: list[str], seed: int, epoch: int, pass_: int = 0) -> list[str]:
    """All ranks compute the same order from (seed, epoch, pass)."""
    order = list(urls)
    random.Random(_seed_int(seed, epoch, pass_)).shuffle(order)
    return order


def unit_shards(urls: list[str], rank: int, world: int, worker: int, workers: int) -> tuple[list[str], int, int]:
    """(shards, slot, slots) this unit reads: shard-level split by node then worker when there
    are enough shards (slot 0 of 1), else all shards with a sample-level split."""
    units = world * workers
    if len(urls) >= units:
        return urls[rank::world][worker::workers], 0, 1
    return list(urls), rank * workers + worker, units


# ---- pipeline stages (each takes and returns an iterator) ----


def shard_source(urls, seed, epoch, rank, world, train, progress: dict) -> Iterator[tuple[str, int, int]]:
    """(url, slot, slots) for this unit; in training, pass after pass (reshuffled) forever."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    pass_ = 0
    while True:
        order = epoch_shard_order(urls, seed, epoch, pass_) if train else list(urls)
        mine, slot, slots = unit_shards(order, rank, world, worker, workers)
        used_before = progress["used"]
        for url in mine:
            yield url, slot, slots
        if not train:
            return
        # Downstream has decoded the whole pass by the time we are asked for more.
        if progress["used"] == used_before:
            raise RuntimeError(
                f"rank {rank} worker {worker}: a full pass over shards {mine} gave no usable sample, so "
                "the epoch could never fill; check them with `python -m blip.data inspect <shards>`")
        pass_ += 1


def read_stage(src, stats: LoaderStats) -> Iterator[RawSample]:
    for url, slot, slots in src:
        i = 0
        for item in iter_shard_samples(url):
            if isinstance(item, ShardEnd):
                if item.error:
                    stats.shard_damaged(url, item.error, item.detail)
                continue
            if i % slots == slot:
                yield item
            i += 1


def decode_stage(src, cfg: DecodeConfig, stats: LoaderStats, progress: dict) -> Iterator[Sample]:
    for raw in src:
        sample = decode_sample(raw, cfg, stats)
        if sample is not None:
            progress["used"] += 1  # monotonic, unlike stats (reset by every batch)
            yield sample


def expand_stage(src, expand: bool) -> Iterator[tuple[Sample, int]]:
    for sample in src:
        if expand:
            for j in range(len(sample.captions)):
                yield sample, j
        else:
            yield sample, 0


def shuffle_stage(src, bufsize: int, rng: random.Random):
    buf = []
    for item in src:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


def batch_stage(src, cfg: LoaderConfig, rng: random.Random, stats: LoaderStats, n_batches: int | None):
    train_tf = TrainTransform(cfg.image_size, cfg.min_scale, cfg.hflip, cfg.randaugment) if cfg.train else None
    eval_tf = EvalTransform(cfg.image_size)
    items: list[tuple[torch.Tensor, str, list[str], Sample]] = []
    emitted = 0

    def make_batch():
        batch = {
            "image": normalize(torch.stack([t for t, _, _, _ in items])),
            "text": [txt for _, txt, _, _ in items],
            "captions": [caps for _, _, caps, _ in items],
            "key": [s.key for _, _, _, s in items],
            "image_id": torch.tensor([s.image_id for _, _, _, s in items], dtype=torch.long),
            "shard": [s.url for _, _, _, s in items],
        }
        stats.pairs += len(items)
        stats.batches += 1
        batch["__stats__"] = stats.take()
        return batch

    for sample, j in src:
        if train_tf is not None:
            tensor, flipped = train_tf(sample.image, rng)
        else:
            tensor, flipped = eval_tf(sample.image), False
        caps = sample.captions
        if flipped and cfg.flip_swaps_text:
            caps = [swap_left_right(c) for c in caps]
        items.append((tensor, caps[j], caps, sample))
        if len(items) == cfg.batch_size:
            yield make_batch()
            items = []
            emitted += 1
            if n_batches is not None and emitted == n_batches:
                return  # the epoch cut: nothing read after this point is counted or lost
    if items and n_batches is None:
        yield make_batch()
    yield {"__stats__": stats.take(), "__end__": True}


class _UnitStream(IterableDataset):
    """The per-unit pipeline; instantiated fresh per epoch so workers see the current epoch."""

    def __init__(self, urls, cfg: LoaderConfig, epoch: int, rank: int, world: int, n_batches: int | None, num_items: int):
        super().__init__()
        self.urls, self.cfg, self.epoch, self.rank, self.world, self.n_batches = urls, cfg, epoch, rank, world, n_batches
        self.num_items = num_items

    def buffer_size(self) -> int:
        # never more than this unit's share of one pass: a buffer bigger than the data would fill
        # from several passes and make an epoch mostly repeats
        info = get_worker_info()
        units = self.world * (info.num_workers if info else 1)
        return max(1, min(self.cfg.shuffle_buffer, self.num_items // units))

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        cfg = self.cfg
        stats = LoaderStats()
        progress = {"used": 0}
        rng = random.Random(_seed_int(cfg.seed, self.epoch, self.rank, worker, 1))
        pipeline = wds.DataPipeline(
            partial(shard_source, self.urls, cfg.seed, self.epoch, self.rank, self.world, cfg.train, progress),
            partial(read_stage, stats=stats),
            partial(decode_stage, cfg=cfg.decode, stats=stats, progress=progress),
            partial(expand_stage, expand=cfg.expand_captions),
            partial(shuffle_stage, bufsize=self.buffer_size(), rng=rng) if cfg.train and cfg.shuffle_buffer > 1 else None,
            partial(batch_stage, cfg=cfg, rng=rng, stats=stats, n_batches=self.n_batches),
        )
        return iter(pipeline)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; one thread each avoids oversubscribing the cores


class BlipLoader:
    """Iterable over batches of a shard set for one rank.

    Batch (dict):
        ``image``     float32 tensor (B, 3, image_size, image_size), CLIP-normalised
        ``text``      list[str], B cleaned captions (``pre_caption``, ``max_words``)
        ``captions``  list[list[str]], all cleaned captions of each item's image
        ``key``       list[str], sample keys (unique within one shard set)
        ``image_id``  long tensor (B,): ``json["image_id"]`` or int(key); equal ids = same image
        ``shard``     list[str], the shard each item came from

    Never contains noise labels or any other ``.json`` field. Tokenization is the model's job.
    ``len(loader)``: batches per epoch on this rank (exact in training; in evaluation an upper
    bound over ranks, exact for one rank and one worker). ``stats`` accumulates over epochs,
    ``epoch_stats`` covers the last (or current) epoch. A complete pass advances ``epoch`` by one;
    ``set_epoch`` sets it (all ranks must use the same epoch for disjoint shard splits).
    An epoch with skips or damaged shards ends with a warning on the ``blip.data`` logger.
    """

    def __init__(self, shards, cfg: LoaderConfig | None = None, rank: int | None = None, world_size: int | None = None, epoch: int = 0):
        self.cfg = cfg or LoaderConfig()
        self.urls = resolve_shards(shards)
        self.rank, self.world_size = dist_info(rank, world_size)
        self.epoch = epoch
        self.workers = max(1, self.cfg.num_workers)
        if self.cfg.num_samples is not None:
            self.num_items = self.cfg.num_samples
        else:
            counts = count_shards(self.urls).values()
            self.num_items = sum(c.pairs if self.cfg.expand_captions else c.samples for c in counts)
        if self.num_items <= 0:
            raise DataError(_no_samples(self.urls))
        self.stats = LoaderStats()
        self.epoch_stats = LoaderStats()

    @property
    def batches_per_worker(self) -> int | None:
        if not self.cfg.train:
            return None
        return math.ceil(self.num_items / (self.cfg.batch_size * self.world_size * self.workers))

    def __len__(self) -> int:
        if self.cfg.train:
            return self.batches_per_worker * self.workers
        return math.ceil(self.num_items / self.world_size / self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        stream = _UnitStream(self.urls, self.cfg, self.epoch, self.rank, self.world_size, self.batches_per_worker, self.num_items)
        if self.cfg.num_workers > 0:
            source = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, worker_init_fn=_worker_init))
        else:
            source = iter(stream)
        self.epoch_stats = LoaderStats()
        min_seen = max(50, min(self.num_items // 10, 1000))  # fail early, not after an epoch on bad data
        for item in source:
            delta = item.pop("__stats__")
            self.epoch_stats.add(delta)
            self.stats.add(delta)
            self.epoch_stats.check_ceiling(self.cfg.max_skipped_fraction, f"rank {self.rank} epoch {self.epoch}", min_seen)
            if item.pop("__end__", False):
                continue
            yield item
        st = self.epoch_stats
        if st.skipped or st.shard_errors:
            _log.warning("rank %d epoch %d: %s", self.rank, self.epoch, st.summary())
        st.check_ceiling(self.cfg.max_skipped_fraction, f"rank {self.rank} epoch {self.epoch}", 1)
        self.epoch += 1


def _no_samples(urls: list[str]) -> str:
    """Why shards that resolved gave no sample: name each one and what reading it found."""
    why = []
    for url in urls[:5]:
        size = f"{os.path.getsize(url)} bytes" if is_local(url) and os.path.isfile(url) else "remote"
        end = next((x for x in iter_shard_samples(url, want=set()) if isinstance(x, ShardEnd)), None)
        found = f"{end.error}: {end.detail}" if end is not None and end.error else "no sample with an image"
        why.append(f"{url} ({size}; {found})")
    more = f" and {len(urls) - 5} more" if len(urls) > 5 else ""
    return (f"no usable samples in {len(urls)} shard(s): {'; '.join(why)}{more}. Check them with `python -m blip.data "
            "inspect <shards>`; regenerate or re-import damaged shards")


def make_loader(shards, rank: int | None = None, world_size: int | None = None, epoch: int = 0, **cfg) -> BlipLoader:
    """Shortcut: ``make_loader("data/generated/web", batch_size=64, num_workers=2)``."""
    return BlipLoader(shards, LoaderConfig(**cfg), rank=rank, world_size=world_size, epoch=epoch)
