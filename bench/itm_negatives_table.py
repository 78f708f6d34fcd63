"""The val table behind ``itm_negatives`` (docs/recipe.md §0.7): one row per choice.

Each choice was run as the pipeline runs it (``dvc repro filter`` with ``itm_negatives`` set in
``pretrain`` and ``finetune_filter``), and its outputs kept in ``<runs>/<choice>/``: ``models/``
(pretrain, filter, tokenizer), ``train/`` (the stages' metrics) and ``scores/`` (the filter
stage's tables). This script reads them and measures, for each choice:

* the final pre-training and filter fine-tuning ITM loss (EMA, from the stages' metrics);
* on ``val`` only: the ITM AUC of each image's own caption against a random other image's
  caption and against its nearest ITC neighbour's caption, and the mean p(match) of the own
  caption — for the pre-trained model and for the filter (``probe_recipe.val_metrics``);
* the filter on the web texts against the hidden noise labels (evaluation only): clean texts
  kept and each noise kind dropped at BLIP's p >= 0.5, ROC-AUC;
* with ``--check``, the synthetic captions against their scenes (``blip.evaluate.caption_check``).

    python bench/itm_negatives_table.py --runs /path/exp_results --data /path/exp/data/generated \\
        --choices uniform below_positive hard --out bench/itm_negatives.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from probe_recipe import val_metrics  # noqa: E402

from blip.checkpoint import load_model  # noqa: E402
from blip.evaluate.filter_quality import evaluate_filter  # noqa: E402
from blip.machine import cpu_name  # noqa: E402
from blip.tokenizer import BlipTokenizer  # noqa: E402


def row(run: Path, data: Path, check: bool) -> dict:
    tok = BlipTokenizer.load(run / "models" / "tokenizer")
    out: dict = {"choice": run.name, "cpu": cpu_name()}
    for stage in ("pretrain", "finetune_filter", "finetune_captioner"):
        m = json.loads((run / "train" / f"{stage}.json").read_text())
        out[f"{stage}/final_ema"] = m.get("final_ema")
        out[f"{stage}/bf16"] = m.get("bf16")
    for name, arch in (("pretrain", "BlipPretrain"), ("filter", "BlipRetrieval")):
        model = load_model(run / "models" / name, arch=arch)
        m = val_metrics(model, tok, str(data / "val"), str(data / "web"), n_web=500)
        out.update({f"{name}/{k}": v for k, v in m.items() if k.startswith("itm/") or k == "itc/r_mean"})
    fq = evaluate_filter(str(run / "scores"), str(data / "web"))
    out["filter/web_auc"] = round(fq["auc"], 4)
    out["filter/clean_kept"] = round(1 - fq["clean_drop_rate"], 4)
    out.update({f"filter/dropped/{k}": round(v["recall"], 4) for k, v in fq["per_kind"].items()})
    if check:
        from blip.evaluate.caption_check import check_synthetic

        out["synthetic"] = check_synthetic(str(run / "scores"), str(data / "web"), threshold=0.5)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="folder with one sub-folder per choice")
    ap.add_argument("--data", required=True, help="generated data root the runs used (val/, web/)")
    ap.add_argument("--choices", nargs="+", default=["hard", "uniform", "below_positive"])
    ap.add_argument("--check", action="store_true", help="also check the synthetic captions against their scenes")
    ap.add_argument("--out", default="bench/itm_negatives.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    for choice in args.choices:
        r = row(Path(args.runs) / choice, Path(args.data), args.check)
        print(json.dumps(r), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
