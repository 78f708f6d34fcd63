"""A small CapFilt world for the capfilt tests: generated shards, tiny random-init models saved
as real checkpoints, and the session's caption and score tables (treat all as read-only; copy
before changing). Import the fixtures into a test module to use them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blip.checkpoint import save_model
from blip.data.corpus import caption_corpus
from blip.data.generator import GenerateConfig, generate
from blip.data.shards import write_shard
from blip.data.tario import RawSample, iter_shard_samples
from blip.model.blip import BlipCaptioner, BlipRetrieval
from blip.model.config import load_preset
from blip.tokenizer import build_tokenizer

WEB, HUMAN, SHARD = 60, 20, 20
QUIET = {"progress": False, "device": "cpu"}


@dataclass
class World:
    root: Path
    web: Path  # 3 shards of 20
    human: Path  # 1 shard of 20, 5 captions per image
    captioner: Path
    filter: Path
    captions: Path  # caption_shards(CaptionConfig(**QUIET)) over web
    scores: Path  # score_shards(FilterConfig(**QUIET)) over web, with captions
    tokenizer: object


def tiny_models(tok, seed: int):
    """A captioner and a filter, shrunk for speed (2 ViT blocks, 2 text layers), random init."""
    cfg = load_preset("tiny", text={**tok.special_ids, "num_hidden_layers": 2}, vision={"depth": 2}, queue_size=64)
    torch.manual_seed(seed)
    return BlipCaptioner(cfg), BlipRetrieval(cfg)


@pytest.fixture(scope="session", name="world")
def world_fixture(tmp_path_factory) -> World:
    from blip.capfilt.caption import caption_shards
    from blip.capfilt.config import CaptionConfig, FilterConfig
    from blip.capfilt.filter import score_shards

    root = tmp_path_factory.mktemp("capfilt")
    generate(GenerateConfig(seed=0, web=WEB, human=HUMAN, val=0, test=0, zeroshot=0, shard_size=SHARD),
             str(root / "gen"), processes=1, progress=False)
    web, human = root / "gen" / "web", root / "gen" / "human"
    tok = build_tokenizer(caption_corpus([web, human]), vocab_size=300)
    cap, filt = tiny_models(tok, seed=0)
    save_model(cap, root / "captioner", tokenizer=tok)
    save_model(filt, root / "filter", tokenizer=tok)
    caption_shards(CaptionConfig(**QUIET), root / "captioner", web, root / "captions")
    score_shards(FilterConfig(**QUIET), root / "filter", web, root / "captions", root / "scores")
    return World(root, web, human, root / "captioner", root / "filter", root / "captions", root / "scores", tok)


def read_members(url) -> list[tuple[str, dict[str, bytes]]]:
    return [(s.key, dict(s.fields)) for s in iter_shard_samples(str(url)) if isinstance(s, RawSample)]


def write_members(out_dir: Path, shard: int, samples: list[tuple[str, dict[str, bytes]]], n_samples: int) -> Path:
    members = [(f"{key}.{ext}", data) for key, fields in samples for ext, data in fields.items()]
    return Path(write_shard(str(out_dir), shard, members, n_samples, n_samples))


@pytest.fixture(scope="session", name="damaged")
def damaged_fixture(world, tmp_path_factory) -> Path:
    """A copy of the web split with bad input, metadata still claiming 20 samples per shard:
    00000 intact; 00001 sample 3 has garbage JPEG bytes (undecodable_image) and sample 5 no image
    (missing_image); 00002 cut in the middle of a sample (truncated_tar, the tail unreadable)."""
    out = tmp_path_factory.mktemp("damaged") / "web"
    out.mkdir()
    shutil.copy(world.web / "00000.tar", out / "00000.tar")
    shutil.copy(world.web / "00000_stats.json", out / "00000_stats.json")
    samples = read_members(world.web / "00001.tar")
    samples[3][1]["jpg"] = b"this is not a jpeg" * 10
    del samples[5][1]["jpg"]
    write_members(out, 1, samples, SHARD)
    tar = write_members(out, 2, read_members(world.web / "00002.tar"), SHARD)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 700])  # inside some sample's data
    return out


def files_state(folder: Path, pattern: str = "*") -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns): unchanged means the file was not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


@pytest.fixture(scope="session", name="damaged_results")
def damaged_results_fixture(world, damaged) -> tuple[Path, Path, dict, dict]:
    """(captions dir, scores dir, caption summary, filter summary) of the damaged web copy."""
    from blip.capfilt.caption import caption_shards
    from blip.capfilt.config import CaptionConfig, FilterConfig
    from blip.capfilt.filter import score_shards

    caps, scores = damaged.parent / "captions", damaged.parent / "scores"
    cs = caption_shards(CaptionConfig(**QUIET), world.captioner, damaged, caps)
    fs = score_shards(FilterConfig(**QUIET), world.filter, damaged, caps, scores)
    return caps, scores, cs, fs
