"""Captioner probe: fine-tune the captioner from a pre-trained model, caption the ``val`` images,
and check every caption against its scene (``blip.evaluate.caption_check``; docs/recipe.md §0.8).

The fine-tune is the pipeline's ``finetune_captioner`` job (``params.yaml`` + ``-S`` overrides) on
the human split; captions come from the caption stage's own worker (``caption_shards``) for each
``--decoding``; the checker labels each caption correct or by its first error. ``val`` only:
recipes are chosen there, never on test/zeroshot. One JSON line per probe to ``--out``.

    python bench/probe_captioner.py --pretrain models/pretrain --data data/generated \\
        -S finetune_captioner.epochs=15 --name epochs-15
    python bench/probe_captioner.py --captioner models/captioner --data data/generated  # no fine-tune
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from blip import params as P  # noqa: E402
from blip.capfilt.caption import caption_shards  # noqa: E402
from blip.evaluate.caption_check import (  # noqa: E402
    CHECK_LABELS,
    CORRECT,
    check_caption,
    generator_config,
    objects_right,
    scene_of_web,
)
from blip.machine import cpu_name  # noqa: E402
from blip.train.trainer import train  # noqa: E402


def check_split(captions: dict[str, str], data: Path, split: str = "val") -> dict:
    """Checker metrics of ``captions`` (key -> text) of ``split`` images of the world in ``data``."""
    cfg = generator_config(str(data / "web"))
    labels, right = Counter(), 0
    for key, text in captions.items():
        scene = scene_of_web(key, cfg, split=split)
        labels[check_caption(text, scene)[0]] += 1
        right += objects_right(text, scene)
    n = len(captions)
    return {"n": n, "objects_right": round(right / n, 4), "correct": round(labels[CORRECT] / n, 4),
            "labels": {k: round(labels[k] / n, 4) for k in (CORRECT, *CHECK_LABELS) if labels[k]}}


def caption_split(captioner: Path, data: Path, split: str, decoding: str, sets: list[str], tmp: Path) -> dict:
    params = P.load("params.yaml", [*sets, f"capfilt.decoding={decoding}"])
    cfg = dataclasses.replace(params.caption, progress=False, workers=1)
    out = tmp / f"captions-{decoding}"
    caption_shards(cfg, captioner, str(data / split), out)
    caps = {}
    for f in sorted(out.glob("*.parquet")):
        t = pq.read_table(f, columns=["key", "caption"]).to_pylist()
        caps.update({r["key"]: r["caption"] for r in t})
    return caps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="generated data root (human/ val/ web/ manifest.json)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrain", help="fine-tune the captioner from this pre-trained model")
    src.add_argument("--captioner", help="check this captioner as it is")
    ap.add_argument("-S", "--set", action="append", default=[], help="params override key=value (repeatable)")
    ap.add_argument("--decoding", nargs="+", default=["beam", "nucleus"])
    ap.add_argument("--split", default="val")
    ap.add_argument("--name", default="")
    ap.add_argument("--keep", help="keep the fine-tuned captioner in this folder")
    ap.add_argument("--out", default="bench/probe_captioner.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    data = Path(args.data)
    row: dict = {"name": args.name, "overrides": args.set, "cpu": cpu_name()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captioner = Path(args.captioner) if args.captioner else Path(args.keep or tmp / "captioner")
        if args.pretrain:
            params = P.load("params.yaml", args.set)
            t0 = time.time()
            s = train(params.train("finetune_captioner"), [str(data / "human")], captioner, init=args.pretrain,
                      model_cfg=None, tokenizer=None, resume_dir=tmp / "resume")
            row.update({"steps": s["steps"], "final_ema": s["final_ema"], "bf16": s["bf16"],
                        "train_s": round(time.time() - t0, 1)})
        for decoding in args.decoding:
            caps = caption_split(captioner, data, args.split, decoding, args.set, tmp)
            row[decoding] = check_split(caps, data, args.split)
            row[decoding]["examples"] = list(caps.values())[:3]
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
