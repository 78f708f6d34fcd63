"""Stages ``evaluate`` (retrieval fine-tuned + zero-shot, captioning) and ``report`` (baseline vs
CapFilt side by side; ends the MLflow bootstrap run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..params import Params
from ..track import Tracker, numeric
from .common import StageError, datasets, write_json


def evaluate(stage, params: Params, tracker: Tracker, *, data: str, out: str, retrieval: str | None = None,
             captioner: str | None = None, predictions: str | None = None) -> dict:
    from ..checkpoint import load_model
    from ..data.layout import gt_path, split_dir
    from ..dist import resolve_device
    from ..evaluate.captioning import evaluate_captioning
    from ..evaluate.retrieval import evaluate_retrieval
    from ..tokenizer import BlipTokenizer

    ev = params.evaluate
    device = resolve_device(ev.device)
    metrics: dict = {}
    if retrieval:
        model = load_model(retrieval).to(device)
        tok = BlipTokenizer.load(Path(retrieval) / "tokenizer")
        for split in ev.retrieval_splits:
            r = evaluate_retrieval(model, tok, split_dir(data, split), k=ev.k_test, batch_size=ev.batch_size,
                                   device=device)
            metrics.update({f"{split}/{k}": v for k, v in r.items()})
    if captioner:
        model = load_model(captioner).to(device)
        m, preds = evaluate_captioning(model, BlipTokenizer.load(Path(captioner) / "tokenizer"),
                                       split_dir(data, ev.caption_split), gt_path(data, ev.caption_split),
                                       batch_size=ev.batch_size, device=device, meteor=ev.meteor)
        metrics.update({f"{ev.caption_split}/{k}": v for k, v in m.items()})
        if predictions:
            write_json(predictions, preds)
            tracker.log_artifact(predictions, "predictions")
    write_json(out, metrics)
    splits = dict.fromkeys([*(ev.retrieval_splits if retrieval else []), *([ev.caption_split] if captioner else [])])
    tracker.log_datasets(datasets([split_dir(data, s) for s in splits], "evaluation"))
    tracker.log_metrics(numeric(metrics))
    return metrics


def _factors_line(params: Params) -> str:
    cf, mp = params.capfilt, params.model
    return (f"CapFilt parts **{cf.parts}**, decoding **{cf.decoding}**, captioner/filter **{cf.models}**, "
            f"pre-training sharing **{mp.sharing}**, preset **{mp.preset}**.")


def report(stage, params: Params, tracker: Tracker, *, metrics: list[str], out: str, dataset_stats: str | None = None,
           filter_quality: str | None = None, dataset: str | None = None, lock: str = "dvc.lock",
           json_out: str | None = None, gallery: str | None = None) -> dict:
    """``metrics``: ``NAME=PATH`` evaluation files, side by side in that order."""
    from ..evaluate.report import dataset_table, filter_by_kind, headline, metrics_table
    from ..machine import describe
    from ..pipeline.mlflow_datasets import lock_md5

    runs = {}
    for item in metrics:
        name, sep, path = item.partition("=")
        if not sep:
            raise StageError(f"--metrics {item!r}: use NAME=PATH, e.g. baseline=metrics/evaluate_baseline.json")
        runs[name] = json.loads(Path(path).read_text())
    extra: dict[str, dict] = {}
    for key, path in (("dataset", dataset_stats), ("filter_quality", filter_quality)):
        if path:
            extra[key] = json.loads(Path(path).read_text())
    parts = [f"# Bootstrap report\n\n{_factors_line(params)}\nMachine: {describe()}.\n",
             f"## Baseline vs CapFilt\n\n{headline(runs)}"]
    if "filter_quality" in extra:
        parts.append(f"## The filter, per noise kind (hidden labels; evaluation only)\n\n"
                     f"{filter_by_kind(extra['filter_quality'])}")
    if gallery:
        rel = os.path.relpath(gallery, Path(out).parent or ".")
        parts.append(f"![CapFilt: web and synthetic texts, kept (green) and dropped (red)]({rel})\n")
        tracker.log_artifact(gallery)
    if "dataset" in extra:
        parts.append(f"## The bootstrapped dataset\n\n{dataset_table(extra['dataset'])}")
    parts.append(f"## All downstream metrics\n\n{metrics_table(runs)}")
    md5 = lock_md5(dataset, lock) if dataset else None  # the bootstrapped dataset's version
    times = tracker.stage_durations()
    if times:
        rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in times.items())
        parts.append(f"## Stage wall time (MLflow child runs of this bootstrap, s)\n\n| stage | s |\n|---|---:|\n{rows}\n"
                     f"| total | {sum(times.values()):.1f} |\n")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(parts))
    if json_out:
        write_json(json_out, {**runs, **extra, "dataset_md5": md5})
    tracker.log_parent_metrics({**numeric(runs), **numeric(extra)})
    if md5:
        tracker.set_parent_tags({"dvc.dataset_md5": md5})
    tracker.log_artifact(out)
    print("\n".join(parts))
    return {"dataset_md5": md5, "runs": list(runs)}
