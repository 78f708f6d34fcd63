"""Generate the embedded dataset: every split as img2dataset-style shards, plus COCO ground truth.

Output layout (``out_dir`` defaults to ``data/generated``)::

    manifest.json                      config, per-split counts, noise summary, vocabulary
    web/00000.tar 00000_stats.json ... sizes.json      one alt-text caption per image, noisy
    human/...                          five clean captions per image (the COCO role)
    val/... test/...                   five captions per image (Karpathy-style eval)
    zeroshot/...                       five captions, unseen backgrounds (the Flickr role)
    annotations/{val,test,zeroshot}_gt.json           COCO caption format

Per sample: ``<key>.jpg`` (JPEG, fixed quality, 4:4:4 so colours survive at 64 px),
``<key>.txt`` (the caption; for multi-caption splits the first one) and ``<key>.json`` with
img2dataset's fields (``key``, ``caption``, ``url``, ``status``, ``error_message``, ``width``,
``height``, ``original_width``, ``original_height``, ``exif``) plus ``captions`` (all of them) and
``image_id`` (= int(key)) for multi-caption splits, and ``noise`` (kind or null) for ``web``.

Determinism: every sample is a function of (seed, split, index) only, shards are written with
fixed tar headers and JPEG settings, so the same config gives byte-identical files however many
processes run.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import layout
from .coco import build_gt, write_gt
from .grammar import describe, vocabulary, web_style
from .importers import previous_splits, staged_output_dir
from .noise import DEFAULT_NOISE_MIX, NOISE_KINDS, corrupt, noise_plan, validate_mix
from .progress import progress_bar
from .render import render
from .shards import (
    MAX_SHARD_SIZE,
    dumps,
    make_key,
    sample_members,
    write_shard,
    write_sizes,
)
from .world import (
    TRAIN_BACKGROUNDS,
    ZEROSHOT_BACKGROUNDS,
    Scene,
    WorldConfig,
    sample_rngs,
    sample_scene,
)

SPLITS = ("web", "human", "val", "test", "zeroshot")
EVAL_SPLITS = ("val", "test", "zeroshot")


@dataclass(frozen=True)
class GenerateConfig:
    """Sizes are numbers of images; the defaults are the embedded run's world (``params.yaml``'s
    ``generate`` section, the ``tiny`` model on 2 CPU cores)."""

    seed: int = 0
    web: int = 3000
    human: int = 600
    val: int = 200
    test: int = 200
    zeroshot: int = 200
    captions_per_image: int = 5
    noise_rate: float = 0.4
    noise_mix: dict = field(default_factory=lambda: dict(DEFAULT_NOISE_MIX))
    shard_size: int = 250
    jpeg_quality: int = 90
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise ValueError(f"shard_size={self.shard_size}: must be in 1..{MAX_SHARD_SIZE} (4-digit in-shard key)")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image={self.captions_per_image}: must be >= 1")
        for split in SPLITS:
            if getattr(self, split) < 0:
                raise ValueError(f"{split}={getattr(self, split)}: must be >= 0")
        validate_mix(self.noise_mix)

    def size(self, split: str) -> int:
        return getattr(self, split)


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def _backgrounds(split: str) -> tuple[str, ...]:
    return ZEROSHOT_BACKGROUNDS if split == "zeroshot" else TRAIN_BACKGROUNDS


def _web_caption(cfg: GenerateConfig, index: int, scene: Scene | None = None) -> tuple[Scene, str, Callable[[Scene], str]]:
    """(scene, clean web caption, re-describer with the same paraphrase draws) of web image ``index``."""
    rngs = sample_rngs(cfg.seed, "web", index)
    if scene is None:
        scene = sample_scene(rngs[0], cfg.world, TRAIN_BACKGROUNDS)

    def caption_of(s):
        fresh = sample_rngs(cfg.seed, "web", index)
        return web_style(describe(s, fresh[2]), fresh[3])

    return scene, caption_of(scene), caption_of


def _distinct_captions(scene, rng, n: int) -> list[str]:
    caps: list[str] = []
    for _ in range(20 * n):  # a one-object scene has dozens of paraphrases, so this ends fast
        c = describe(scene, rng)
        if c not in caps:
            caps.append(c)
            if len(caps) == n:
                break
    while len(caps) < n:
        caps.append(describe(scene, rng))
    return caps


def make_sample(cfg: GenerateConfig, split: str, index: int, noise_kind: str | None = None):
    """One sample: (PIL image, captions, noise kind). Pure function of (cfg, split, index, kind)."""
    rngs = sample_rngs(cfg.seed, split, index)
    scene = sample_scene(rngs[0], cfg.world, _backgrounds(split))
    image = render(scene, rngs[1], cfg.world)
    if split != "web":
        return image, _distinct_captions(scene, rngs[2], cfg.captions_per_image), None
    _, clean, caption_of = _web_caption(cfg, index, scene)
    if noise_kind is None:
        return image, [clean], None

    def other_caption(rng):
        n = max(cfg.web, 2)  # with a 1-image split, "another image" is image 1 of the same world
        j = (index + 1 + int(rng.integers(n - 1))) % n
        return _web_caption(cfg, j)[1]

    return image, [corrupt(noise_kind, scene, clean, caption_of, other_caption, rngs[4], cfg.world)], noise_kind


def _shard_job(args) -> dict:
    cfg, split, shard, start, stop, kinds, out_dir = args
    members: list[tuple[str, bytes]] = []
    noise = Counter()
    gt_images, gt_captions = [], {}
    pairs = 0
    for i, index in enumerate(range(start, stop)):
        key = make_key(shard, i)
        kind = kinds[i] if kinds is not None else None
        image, captions, noise_kind = make_sample(cfg, split, index, kind)
        w, h = image.size
        meta = {
            "key": key, "caption": captions[0], "url": f"generated://{split}/{key}.jpg", "status": "success",
            "error_message": None, "width": w, "height": h, "original_width": w, "original_height": h, "exif": None,
        }
        if split == "web":
            meta["noise"] = noise_kind  # evaluation only: read back solely by labels.noise_labels
            noise[noise_kind or "clean"] += 1
        else:
            meta["captions"] = captions
            meta["image_id"] = int(key)
        members += sample_members(key, _jpeg(image, cfg.jpeg_quality), captions[0], meta)
        pairs += len(captions)
        if split in EVAL_SPLITS:
            gt_images.append({"id": int(key), "file_name": f"{key}.jpg", "width": w, "height": h, "key": key,
                              "shard": f"{split}/{shard:05d}.tar"})
            gt_captions[int(key)] = captions
    path = write_shard(os.path.join(out_dir, split), shard, members, stop - start, pairs)
    return {"split": split, "shard": shard, "path": path, "samples": stop - start, "pairs": pairs,
            "noise": dict(noise), "gt_images": gt_images, "gt_captions": gt_captions}


def _jobs(cfg: GenerateConfig, splits, out_dir: str) -> list[tuple]:
    jobs = []
    for split in splits:
        n = cfg.size(split)
        plan = noise_plan(n, cfg.noise_rate, cfg.noise_mix, cfg.seed) if split == "web" else None
        for shard, start in enumerate(range(0, n, cfg.shard_size)):
            stop = min(start + cfg.shard_size, n)
            jobs.append((cfg, split, shard, start, stop, plan[start:stop] if plan else None, out_dir))
    return jobs


def generate(cfg: GenerateConfig, out_dir: str = "data/generated", splits=SPLITS, processes: int | None = None, progress: bool = True) -> dict:
    """Write the dataset to ``out_dir`` and return the summary also written as ``manifest.json``.

    ``processes``: worker processes (default: CPU count; output does not depend on it).
    The generated splits are written into a fresh folder that replaces ``out_dir`` in one step
    (``staged_output_dir``): a folder never mixes two configs, and a run that fails leaves the
    previous one as it was. Splits not generated this time are kept.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; known: {list(SPLITS)}")
    t0 = time.perf_counter()
    replaced = ["manifest.json", *splits, *(layout.gt_path("", s) for s in splits if s in EVAL_SPLITS)]
    with staged_output_dir(out_dir, replaced) as tmp:
        jobs = _jobs(cfg, splits, tmp)
        processes = processes or os.cpu_count() or 1
        results = []
        bar = progress_bar(sum(j[4] - j[3] for j in jobs), progress, "generate")
        if processes > 1 and len(jobs) > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(min(processes, len(jobs))) as pool:
                for r in pool.imap_unordered(_shard_job, jobs):
                    results.append(r)
                    bar.update(r["samples"])
        else:
            for job in jobs:
                results.append(_shard_job(job))
                bar.update(results[-1]["samples"])
        bar.close()
        results.sort(key=lambda r: (SPLITS.index(r["split"]), r["shard"]))
        manifest = _finish(cfg, splits, tmp, results, previous_splits(out_dir, splits))
    manifest_timing = {"seconds": round(time.perf_counter() - t0, 2)}
    return {**manifest, "timing": manifest_timing}


def _finish(cfg: GenerateConfig, splits, out_dir: str, results: list[dict], previous: dict) -> dict:
    """sizes.json, GT and manifest.json of the generated splits; ``previous``: manifest entries of the kept ones."""
    split_info = {}
    for split in splits:
        rs = [r for r in results if r["split"] == split]
        write_sizes(os.path.join(out_dir, split), {os.path.basename(r["path"]): r["samples"] for r in rs})
        info = {
            "shards": [os.path.relpath(r["path"], out_dir) for r in rs],
            "images": sum(r["samples"] for r in rs),
            "pairs": sum(r["pairs"] for r in rs),
        }
        if split in EVAL_SPLITS:
            images = [im for r in rs for im in r["gt_images"]]
            captions = {k: v for r in rs for k, v in r["gt_captions"].items()}
            gt_path = layout.gt_path(out_dir, split)
            write_gt(gt_path, build_gt(images, captions, f"blip-bootstrap generated world, split {split}, seed {cfg.seed}"))
            info["gt"] = os.path.relpath(gt_path, out_dir)
        split_info[split] = info
    manifest = {
        "generator": "blip.data.generator",
        "format": "img2dataset-webdataset",
        "config": _jsonable(asdict(cfg)),
        "splits": {**previous, **split_info},
        "vocabulary": vocabulary(cfg.world),
    }
    if "web" in splits:
        noise = Counter()
        for r in results:
            noise.update(r["noise"])
        n = sum(noise.values())
        manifest["noise_summary"] = {
            "kinds": {k: noise.get(k, 0) for k in NOISE_KINDS},
            "clean": noise.get("clean", 0),
            "rate": round((n - noise.get("clean", 0)) / n, 6) if n else 0.0,
        }
    with open(os.path.join(out_dir, "manifest.json"), "wb") as f:
        f.write(dumps(manifest))
    return manifest


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
