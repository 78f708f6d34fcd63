"""The ``caption`` stage: synthetic captions of every web image, one table per web shard.

Paper §3.3: the captioner (image-grounded decoder fine-tuned on the human pairs) writes one
caption per web image with nucleus sampling (p 0.9); Table 2 compares beam search (3 beams),
which gives safer but less diverse captions that the filter keeps more often.

Output: ``out_dir/<shard>.parquet`` per web shard, one row per input sample, in shard order::

    key      str   the sample key
    caption  str   synthetic caption, prompt stripped, pre_caption-ed ("" unless status is ok)
    status   str   "ok"; the loader's skip reason for an unusable sample (undecodable_image,
                   missing_caption, truncated_tar, ...); "empty_caption" when the cleaned
                   caption is empty (with candidates: all of them are)
    candidates list<str>  only with ``candidates: N`` > 1: all N samples, cleaned, in draw order
                   (``caption`` is the first; an empty one stays ""); null for unusable samples

``candidates: N`` (BLIP-2, LAION-COCO): N nucleus samples per image in one pass — the ViT and the
prompt run once per image, the decoder's cache is fanned out N ways (``generate(repeats=N)``).

Determinism: each caption's sampling draws come from its own seed, derived from (``seed``, shard
file name, key, candidate index; :func:`candidate_seed`), so a caption does not depend on the batch
size, the batch it lands in, the number of workers, which shards ran before or how many other
candidates were drawn (candidate 0 is the one-caption run's caption).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from functools import partial

import pyarrow as pa
import torch

from ..data.shards import resolve_shards, shard_file_name
from ..data.text import PRETRAIN_MAX_WORDS, pre_caption
from .config import CaptionConfig
from .fingerprint import config_hash, file_fingerprint
from .models import InferenceModel, model_fingerprint
from .reader import ShardReader
from .records import OK, ShardResult, ShardTask
from .shardwork import result_name, run_shards, shard_tasks

STAGE = "caption"
VERSION = 1  # bump when the table's meaning changes, so old results are recomputed
EMPTY_CAPTION = "empty_caption"

SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("status", pa.string())])
CANDIDATES_SCHEMA = SCHEMA.append(pa.field("candidates", pa.list_(pa.string())))


def image_seed(seed: int, shard: str, key: str) -> int:
    """Per-image sampling seed from (run seed, shard file name, key); 63 bits."""
    digest = hashlib.blake2b(f"{seed}\0{shard}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def candidate_seed(seed: int, shard: str, key: str, candidate: int) -> int:
    """The seed of one image's ``candidate``-th caption: :func:`image_seed` for candidate 0 (so
    ``candidates: 1`` is BLIP's one caption), its own 63-bit seed for each other."""
    return image_seed(seed, shard, key if candidate == 0 else f"{key}\0{candidate}")


class CaptionWorker:
    """Captions one web shard (built once per thread pool / process; loads the captioner)."""

    def __init__(self, cfg: CaptionConfig, captioner_dir: str, vocab_file: str | None = None):
        self.cfg = cfg
        self.m = InferenceModel(captioner_dir, "captioner", cfg.device, vocab_file)
        self.gen = cfg.generation()
        self.prompt = self.m.tokenizer.prompt_ids(self.m.model.cfg.prompt)

    def __call__(self, task: ShardTask) -> ShardResult:
        reader = ShardReader(task.url, self.m.image_size, self.cfg.batch_size)
        shard = shard_file_name(task.url)  # the file name, also inside a URL: seeds do not depend on where it lives
        n = self.cfg.candidates
        captions: dict[int, list[str]] = {}
        with torch.inference_mode():
            for b in reader.batches():
                seeds = None
                if self.cfg.method == "nucleus":
                    seeds = [candidate_seed(self.cfg.seed, shard, k, c) for k in b.keys for c in range(n)]
                ids = self.m.model.generate(b.images.to(self.m.device), self.prompt, self.gen, seeds=seeds, repeats=n)
                texts = self.m.decode(ids[:, len(self.prompt):])  # prompt stripped, as BLIP's generate
                for i, row in enumerate(b.rows):
                    captions[row] = [pre_caption(t, PRETRAIN_MAX_WORDS) for t in texts[i * n:(i + 1) * n]]
        status = list(reader.status)
        for row, texts in captions.items():
            if not any(texts):  # every candidate empty
                status[row] = EMPTY_CAPTION
        rows = range(len(reader.keys))
        data = {"key": reader.keys, "caption": [captions[i][0] if i in captions else "" for i in rows], "status": status}
        if n > 1:
            data["candidates"] = [captions.get(i) for i in rows]
        table = pa.table(data, schema=CANDIDATES_SCHEMA if n > 1 else SCHEMA)
        return ShardResult(table, shard_error=reader.shard_error)


def caption_shards(cfg: CaptionConfig, captioner_dir, web_shards, out_dir, tracker=None, vocab_file=None,
                   ray=None) -> dict:
    """Caption every web image of ``web_shards`` (anything ``resolve_shards`` takes) with the
    captioner ``captioner_dir`` (ours, an official ``.pth`` + ``vocab_file``, or a transformers
    folder: ``sources.py``); results in ``out_dir`` (module docstring). Finished shards
    are skipped (``records`` idempotency rule: same captioner weights, same ``identity()``,
    same input shard). ``ray``: ``RayOptions`` for ``executor: ray``. Returns the ``run_shards`` summary."""
    urls = resolve_shards(web_shards)
    cfg_hash = config_hash(STAGE, VERSION, {**cfg.identity(), "captioner": model_fingerprint(captioner_dir, vocab_file)})
    tasks = shard_tasks(urls, result_name, lambda u: {"shard": file_fingerprint(u)})
    if tracker is not None:
        tracker.log_params({f"{STAGE}.{k}": v for k, v in asdict(cfg).items()})
    return run_shards(STAGE, tasks, out_dir, partial(CaptionWorker, cfg, str(captioner_dir), vocab_file), cfg_hash,
                      workers=cfg.workers, executor=cfg.executor, tracker=tracker, progress=cfg.progress, ray=ray)


__all__ = ["CANDIDATES_SCHEMA", "EMPTY_CAPTION", "OK", "SCHEMA", "CaptionConfig", "CaptionWorker", "candidate_seed",
           "caption_shards", "image_seed"]
