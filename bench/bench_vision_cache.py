"""The frozen ViT's token cache (``TrainConfig.vision_cache_mib``): a training job's seconds with
and without it, on the same shards, in one process.

Each job runs twice, through the trainer as the stages run it (the params.yaml section, the
pre-trained init for the fine-tunes), once with the cache off (``vision_cache_mib: 0``) and once
on; the row gives both times, their ratio, the cache's hits and misses and the final losses of
both (equal up to float rounding). Run it on a quiet machine: it measures wall time.

    python bench/bench_vision_cache.py --data data/generated --pretrain models/pretrain \
        --jobs finetune_captioner pretrain --web-shards 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from blip import params as P  # noqa: E402
from blip.machine import cpu_name  # noqa: E402
from blip.tokenizer import BlipTokenizer  # noqa: E402
from blip.train.trainer import train  # noqa: E402


def run(params, job: str, shards, out: Path, pretrain: Path, tokenizer: Path, mib: int, vision_init: Path) -> dict:
    cfg = dataclasses.replace(params.train(job), vision_cache_mib=mib, progress=False)
    if job == "pretrain":
        tok = BlipTokenizer.load(tokenizer)
        return train(cfg, shards, out, model_cfg=params.model.config(tok.special_ids), tokenizer=tok,
                     vision_init=vision_init, text_init=None)
    return train(cfg, shards, out, init=pretrain)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/generated")
    ap.add_argument("--pretrain", default="models/pretrain", help="the fine-tunes' init")
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--vision-init", default="models/warmstart_vision")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--jobs", nargs="+", default=["finetune_captioner", "pretrain"])
    ap.add_argument("--web-shards", type=int, default=8, help="pretrain: this many web shards (+ human)")
    ap.add_argument("--out", default="bench/bench_vision_cache.jsonl")
    a = ap.parse_args(argv)

    params = P.load(a.params)
    data = Path(a.data)
    rows = []
    for job in a.jobs:
        if job == "pretrain":
            shards = sorted((data / "web").glob("*.tar"))[: a.web_shards] + [data / "human"]
        else:
            shards = data / "human"
        times = {}
        with tempfile.TemporaryDirectory() as tmp:
            for mib in (0, 2048):
                s = run(params, job, shards, Path(tmp) / f"{job}{mib}", Path(a.pretrain), Path(a.tokenizer), mib,
                        Path(a.vision_init))
                times[mib] = s
        off, on = times[0], times[2048]
        row = {"job": job, "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "bf16": on["bf16"], "steps": on["steps"],
               "seconds_off": off["seconds"], "seconds_on": on["seconds"],
               "speedup": round(off["seconds"] / on["seconds"], 3), "cache": on["vision_cache"],
               "final_off": off["final"], "final_on": on["final"]}
        print(json.dumps(row))
        rows.append(row)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
