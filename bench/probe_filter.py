"""Filter probe: fine-tune the filter from a pre-trained model as the ``finetune_filter`` stage
does, score the web texts and the synthetic captions as the ``filter`` stage does, and measure it
per kind of web noise (hidden labels) and on the synthetic captions (the caption checker):
docs/recipe.md §0.11. ``val`` decides recipes; the web texts' labels only measure.

    python bench/probe_filter.py --pretrain models/pretrain --data data/generated \\
        --captions data/capfilt/captions -S finetune_filter.itm_negatives=hard --name hard
    python bench/probe_filter.py --filter models/filter --data data/generated --captions data/capfilt/captions

One JSON line per probe to ``--out``: the fine-tune's final losses, ``val`` ITM AUC of each image's
own caption against a random and against its nearest ITC neighbour's caption (``probe_recipe``),
clean web texts kept and each kind dropped at BLIP's p >= 0.5, the web ROC-AUC, and on the
synthetic captions the filter's ITM ROC-AUC against the checker and its rejection rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from probe_recipe import val_metrics  # noqa: E402

from blip import params as P  # noqa: E402
from blip.capfilt.filter import score_shards  # noqa: E402
from blip.checkpoint import load_model  # noqa: E402
from blip.evaluate.caption_check import check_synthetic  # noqa: E402
from blip.evaluate.filter_quality import evaluate_filter  # noqa: E402
from blip.machine import cpu_name  # noqa: E402
from blip.tokenizer import BlipTokenizer  # noqa: E402
from blip.train.trainer import train  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="generated data root (human/ val/ web/)")
    ap.add_argument("--captions", help="the caption stage's output (synthetic captions of the web images)")
    ap.add_argument("--tokenizer", default="models/tokenizer")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrain", help="fine-tune the filter from this pre-trained model")
    src.add_argument("--filter", help="measure this filter as it is")
    ap.add_argument("-S", "--set", action="append", default=[], help="params override key=value (repeatable)")
    ap.add_argument("--name", default="")
    ap.add_argument("--keep", help="keep the fine-tuned filter in this folder")
    ap.add_argument("--out", default="bench/probe_filter.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    data = Path(args.data)
    params = P.load("params.yaml", args.set)
    row: dict = {"name": args.name, "overrides": args.set, "cpu": cpu_name()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        filt = Path(args.filter) if args.filter else Path(args.keep or tmp / "filter")
        if args.pretrain:
            t0 = time.time()
            s = train(params.train("finetune_filter"), [str(data / "human")], filt, init=args.pretrain,
                      model_cfg=None, tokenizer=None, resume_dir=tmp / "resume")
            row.update({"steps": s["steps"], "final_ema": s["final_ema"], "bf16": s["bf16"],
                        "train_s": round(time.time() - t0, 1)})
        model = load_model(filt, arch="BlipRetrieval")
        m = val_metrics(model, BlipTokenizer.load(args.tokenizer), str(data / "val"), str(data / "web"), n_web=500)
        row.update({f"val/{k}": v for k, v in m.items() if k.startswith("itm/") or k == "itc/r_mean"})
        scores = tmp / "scores"
        t0 = time.time()
        score_shards(dataclasses.replace(params.filter, progress=False), filt, str(data / "web"), args.captions, scores)
        row["score_s"] = round(time.time() - t0, 1)
        fq = evaluate_filter(str(scores), str(data / "web"))
        row["web_auc"] = round(fq["auc"], 4)
        row["clean_kept"] = round(1 - fq["clean_drop_rate"], 4)
        row["dropped"] = {k: round(v["recall"], 4) for k, v in fq["per_kind"].items()}
        row["kind_auc"] = {k: round(v["auc"], 4) for k, v in fq["per_kind"].items()}
        if args.captions:
            syn = check_synthetic(str(scores), str(data / "web"), threshold=0.5)
            row["synthetic"] = {k: v for k, v in syn.items() if not isinstance(v, (list, dict))}
            row["synthetic"]["kept_by_label"] = {k: v["kept_fraction"] for k, v in syn["per_label"].items() if v["count"]}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
