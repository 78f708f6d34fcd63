"""Command line: ``python -m blip.data {generate, import-coco, import-flickr, inspect, contact-sheet}``.

Each command shows a progress bar and ends with a summary (images, pairs, noise rate per kind,
skipped by reason). ``main(argv)`` is a function so tests drive the real entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .generator import SPLITS, GenerateConfig
from .importers import MAX_SKIPPED_FRACTION
from .layout import DEFAULT_ROOT
from .world import WorldConfig


def _summary(manifest: dict) -> str:
    lines = []
    for split, info in manifest.get("splits", {}).items():
        extra = f"  gt {info['gt']}" if "gt" in info else ""
        lines.append(f"  {split:9s} {info['images']:7d} images {info['pairs']:7d} pairs {len(info['shards']):4d} shards{extra}")
    noise = manifest.get("noise_summary")
    if noise:
        total = noise["clean"] + sum(noise["kinds"].values())
        lines.append(f"  web noise rate {noise['rate']:.3f} ({total - noise['clean']}/{total})")
        for kind, n in noise["kinds"].items():
            lines.append(f"    {kind:16s} {n:6d}  ({n / total if total else 0:.3f} of web)")
    skipped = manifest.get("skipped", {})
    lines.append("  skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"))
    examples = manifest.get("skipped_examples", [])  # importers: the first few, by name
    for r in examples:
        lines.append(f"    {r['reason']:13s} {r['file']} ({r['split']}, image id {r['image_id']})")
    if sum(skipped.values()) > len(examples) and examples:
        lines.append(f"    ... and {sum(skipped.values()) - len(examples)} more")
    if manifest.get("skipped_lists"):
        lines.append("    every one listed in " + ", ".join(manifest["skipped_lists"]))
    if "timing" in manifest:
        lines.append(f"  took {manifest['timing']['seconds']:.1f} s")
    return "\n".join(lines)


def _cmd_generate(a) -> int:
    from .generator import SPLITS, GenerateConfig, generate
    from .noise import DEFAULT_NOISE_MIX
    from .world import WorldConfig

    try:
        mix = json.loads(a.noise_mix) if a.noise_mix else dict(DEFAULT_NOISE_MIX)
    except json.JSONDecodeError as e:
        return _error(a.command, f"--noise-mix {a.noise_mix!r} is not JSON ({e}); e.g. '{{\"spam\": 1, \"unrelated\": 3}}'")
    splits = tuple(s.strip() for s in a.splits.split(",")) if a.splits else SPLITS
    try:
        cfg = GenerateConfig(
            seed=a.seed, web=a.web, human=a.human, val=a.val, test=a.test, zeroshot=a.zeroshot,
            captions_per_image=a.captions_per_image, noise_rate=a.noise_rate, noise_mix=mix,
            shard_size=a.shard_size, jpeg_quality=a.jpeg_quality,
            world=WorldConfig(image_size=a.image_size, n_shapes=a.n_shapes, n_colours=a.n_colours,
                              object_scale=a.object_scale),
        )
        manifest = generate(cfg, a.out, splits=splits, processes=a.processes, progress=not a.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        return _error(a.command, e)
    print(f"wrote {a.out}\n" + _summary(manifest))
    return 0


def _cmd_import(a, which: str) -> int:
    from .importers import import_coco_karpathy, import_flickr_karpathy

    try:
        if which == "coco":
            manifest = import_coco_karpathy(a.karpathy_json, a.image_root, a.out, a.shard_size, a.max_side, not a.quiet,
                                            max_skipped_fraction=a.max_skipped_fraction)
        else:
            manifest = import_flickr_karpathy(a.karpathy_json, a.image_root, a.out, a.as_zeroshot, a.shard_size, a.max_side,
                                              not a.quiet, max_skipped_fraction=a.max_skipped_fraction)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        return _error(a.command, e)
    print(f"wrote {a.out}\n" + _summary(manifest))
    return 0


def _error(command: str, e: Exception | str) -> int:
    """Input a person has to fix: the message alone (it names the file and what to do), exit 2,
    as ``python -m blip`` does."""
    print(f"python -m blip.data {command}: error: {e}", file=sys.stderr)
    return 2


def _cmd_inspect(a) -> int:
    from .importers import inspect_shards
    from .loader import make_loader
    from .progress import progress_bar

    info = inspect_shards(a.shards)
    print(f"{a.shards}: {info['shards']} shards, {info['samples']} samples, {info['pairs']} pairs (from metadata)")
    loader = make_loader(a.shards, batch_size=256, train=False, image_size=a.image_size, num_workers=a.workers)
    bar = progress_bar(info["samples"], not a.quiet, "inspect")
    pairs = 0
    for batch in loader:
        bar.update(len(batch["key"]))
        pairs += sum(len(c) for c in batch["captions"])
    bar.close()
    st = loader.epoch_stats
    print(f"  read {st.seen} samples: {st.used} usable images, {pairs} usable pairs")
    print("  skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(st.skipped.items())) or "none"))
    print("  converted: " + (", ".join(f"{k} {v}" for k, v in sorted(st.converted.items())) or "none"))
    if st.shard_errors:
        print("  damaged shards: " + ", ".join(f"{k} {v}" for k, v in sorted(st.shard_errors.items())))
    st.check()
    return 0


def _cmd_contact_sheet(a) -> int:
    from .contact_sheet import contact_sheet

    shards = a.shards or os.path.join(a.root, a.split)
    out = contact_sheet(shards, a.out, n=a.n, cols=a.cols, cell=a.cell)
    print(f"wrote {a.out}: {out['samples']} samples, {out['noisy']} marked noisy")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blip.data",
        description="Generate, import, inspect and picture image-text shard sets (img2dataset/webdataset layout).")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write the generated world (all splits) as shards + COCO GT")
    g.add_argument("--out", default=DEFAULT_ROOT, help="output root (default: %(default)s)")
    gd, wd = GenerateConfig(), WorldConfig()  # the defaults live in the dataclasses, once
    g.add_argument("--seed", type=int, default=gd.seed)
    for split in SPLITS:
        g.add_argument(f"--{split}", type=int, default=gd.size(split), help=f"images in {split} (default: %(default)s)")
    g.add_argument("--splits", default="", help="comma-separated subset of splits to write (default: all)")
    g.add_argument("--captions-per-image", type=int, default=gd.captions_per_image, help="for human/val/test/zeroshot (default: %(default)s)")
    g.add_argument("--noise-rate", type=float, default=gd.noise_rate, help="fraction of corrupted web captions (default: %(default)s)")
    g.add_argument("--noise-mix", default="", help='JSON weights per kind, e.g. \'{"spam": 1, "unrelated": 3}\'')
    g.add_argument("--image-size", type=int, default=wd.image_size, help="pixels (default: %(default)s)")
    g.add_argument("--n-shapes", type=int, default=wd.n_shapes, help="shapes in play, 1..8 (default: %(default)s)")
    g.add_argument("--n-colours", type=int, default=wd.n_colours, help="colours in play, 2..12 (default: %(default)s)")
    g.add_argument("--object-scale", type=float, default=wd.object_scale,
                   help="multiplies every object's radius, 0.5..1.5 (default: %(default)s)")
    g.add_argument("--shard-size", type=int, default=gd.shard_size, help="samples per shard (default: %(default)s)")
    g.add_argument("--jpeg-quality", type=int, default=gd.jpeg_quality)
    g.add_argument("--processes", type=int, default=None, help="worker processes (default: all cores)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, helptext in (("import-coco", "COCO images + Karpathy dataset_coco.json -> shards + GT"),
                           ("import-flickr", "Flickr30k images + Karpathy dataset_flickr30k.json -> shards + GT")):
        i = sub.add_parser(name, help=helptext)
        i.add_argument("karpathy_json", help="Karpathy split file (dataset_coco.json / dataset_flickr30k.json)")
        i.add_argument("image_root", help="folder the JSON's filepath/filename are relative to")
        i.add_argument("--out", required=True, help="output root")
        i.add_argument("--shard-size", type=int, default=1000)
        i.add_argument("--max-side", type=int, default=None, help="downscale images whose longer side exceeds this")
        i.add_argument("--max-skipped-fraction", type=float, default=MAX_SKIPPED_FRACTION,
                       help="fail, writing nothing, when more of the listed images than this are missing, unreadable, "
                            "undecodable or without captions (default: %(default)s; each split's skipped.jsonl lists them)")
        i.add_argument("--quiet", action="store_true")
        if name == "import-flickr":
            i.add_argument("--as-zeroshot", action="store_true", help="write only the test split, as zeroshot/")

    s = sub.add_parser("inspect", help="read a shard set (e.g. an img2dataset folder) and report what the loader can use")
    s.add_argument("shards", help="folder, tar, or brace pattern")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--quiet", action="store_true")

    c = sub.add_parser("contact-sheet", help="PNG grid of samples with captions; noisy web pairs marked red")
    c.add_argument("--split", default="web")
    c.add_argument("--root", default=DEFAULT_ROOT)
    c.add_argument("--shards", default=None, help="shard folder/pattern (overrides --root/--split)")
    c.add_argument("--out", required=True, help="PNG path")
    c.add_argument("-n", type=int, default=48, help="samples (default: %(default)s)")
    c.add_argument("--cols", type=int, default=8)
    c.add_argument("--cell", type=int, default=160, help="tile width in pixels")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = build_parser().parse_args(argv)
    if a.command == "generate":
        return _cmd_generate(a)
    if a.command == "import-coco":
        return _cmd_import(a, "coco")
    if a.command == "import-flickr":
        return _cmd_import(a, "flickr")
    if a.command == "inspect":
        return _cmd_inspect(a)
    return _cmd_contact_sheet(a)


if __name__ == "__main__":
    sys.exit(main())
