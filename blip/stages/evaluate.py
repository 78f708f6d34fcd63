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
             captioner: str | None = None, predictions: str | None = None, ranks: str | None = None) -> dict:
    """``ranks``: also write the per-query retrieval ranks, ``{split: {"txt_ranks", "img_ranks",
    "txt2img", "image_ids"}}`` (``blip.evaluate.retrieval.evaluate_retrieval_ranks``), the input
    of the report's paired bootstrap intervals."""
    import torch

    from ..checkpoint import load_model
    from ..data.layout import gt_path, split_dir
    from ..dist import bf16_enabled, resolve_device
    from ..evaluate.captioning import evaluate_captioning
    from ..evaluate.retrieval import evaluate_retrieval_ranks
    from ..tokenizer import BlipTokenizer

    if ranks and not retrieval:
        raise StageError(f"--ranks {ranks}: the ranks come from retrieval; pass --retrieval MODEL too")
    ev = params.evaluate
    device = resolve_device(ev.device)
    metrics: dict = {}
    if retrieval:
        model = load_model(retrieval).to(device)
        tok = BlipTokenizer.load(Path(retrieval) / "tokenizer")
        per_query = {}
        bf16 = bf16_enabled(ev.bf16, device)
        for split in ev.retrieval_splits:
            # captioning stays fp32: its beams gained nothing from bf16 (docs/recipe.md §0.10)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                r, per_query[split] = evaluate_retrieval_ranks(model, tok, split_dir(data, split), k=ev.k_test,
                                                               batch_size=ev.batch_size, device=device)
            metrics.update({f"{split}/{k}": v for k, v in r.items()})
        if ranks:
            write_json(ranks, per_query)
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
    score = cf.filter_score + (" — an evaluation instrument, not a filter: the hidden noise labels decide the web "
                               "texts" if cf.filter_score == "oracle" else "")
    return (f"CapFilt parts **{cf.parts}**, decoding **{cf.decoding}**, captioner/filter **{cf.models}**, "
            f"filter score **{score}**, pre-training sharing **{mp.sharing}**, preset **{mp.preset}**.")


def _named_paths(option: str, items: list[str], example: str) -> dict[str, str]:
    """``["baseline=a.json", ...]`` -> ``{"baseline": "a.json", ...}`` (order kept)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise StageError(f"--{option} {item!r}: use NAME=PATH, e.g. {example}")
        out[name] = path
    return out


def _intervals(ranks: list[str]) -> dict:
    """The paired bootstrap of ``new − base`` r_mean per split, from two ``evaluate --ranks`` files
    (``baseline`` and ``capfilt`` when so named, else the first is the base). Refuses files whose
    queries differ: an interval over different test sets would mean nothing."""
    from ..evaluate.intervals import detectable_effect, paired_bootstrap, same_queries

    paths = _named_paths("ranks", ranks, "baseline=data/predictions/baseline_ranks.json")
    if len(paths) != 2:
        raise StageError(f"--ranks: give exactly two NAME=PATH files (baseline first), got {len(paths)}")
    base, new = ("baseline", "capfilt") if set(paths) == {"baseline", "capfilt"} else tuple(paths)
    files = {name: json.loads(Path(paths[name]).read_text()) for name in (base, new)}
    if set(files[base]) != set(files[new]):
        raise StageError(f"--ranks: {paths[base]} has splits {sorted(files[base])} but {paths[new]} has "
                         f"{sorted(files[new])}; evaluate both with the same evaluate.retrieval_splits")
    out = {"difference": f"{new} − {base}", "metric": "r_mean", "files": {base: paths[base], new: paths[new]}}
    for split in files[base]:
        a, b = files[new][split], files[base][split]
        why = same_queries(a, b)
        if why:
            raise StageError(f"--ranks: {paths[new]} and {paths[base]} do not rank the same {split} queries ({why}); "
                             "evaluate both models on the same data (rerun the evaluate stages)")
        r = paired_bootstrap(a, b)
        out[split] = {**r, f"{new}_r_mean": r["a"], f"{base}_r_mean": r["b"], "detectable_effect": detectable_effect(r)}
    return out


def report(stage, params: Params, tracker: Tracker, *, metrics: list[str], out: str, dataset_stats: str | None = None,
           filter_quality: str | None = None, dataset: str | None = None, lock: str = "dvc.lock",
           json_out: str | None = None, gallery: str | None = None, ranks: list[str] | None = None) -> dict:
    """``metrics``: ``NAME=PATH`` evaluation files, side by side in that order. ``ranks``: two
    ``NAME=PATH`` per-query ranks files (``evaluate --ranks``): the difference's paired bootstrap
    interval per split and the smallest effect it can detect (``intervals`` in the JSON)."""
    from ..evaluate.report import (
        dataset_table,
        filter_by_kind,
        headline,
        intervals_text,
        metrics_table,
        synthetic_check_table,
    )
    from ..machine import describe
    from ..pipeline.mlflow_datasets import lock_md5

    runs = {name: json.loads(Path(path).read_text()) for name, path in
            _named_paths("metrics", metrics, "baseline=metrics/evaluate_baseline.json").items()}
    extra: dict[str, dict] = {}
    for key, path in (("dataset", dataset_stats), ("filter_quality", filter_quality)):
        if path:
            extra[key] = json.loads(Path(path).read_text())
    if ranks:
        extra["intervals"] = _intervals(ranks)
    parts = [f"# Bootstrap report\n\n{_factors_line(params)}\nMachine: {describe()}.\n",
             f"## Baseline vs CapFilt\n\n{headline(runs)}"]
    if "intervals" in extra:
        parts.append(intervals_text(extra["intervals"]))
    if "filter_quality" in extra:
        parts.append(f"## The filter, per noise kind (hidden labels; evaluation only)\n\n"
                     f"{filter_by_kind(extra['filter_quality'])}")
        if "synthetic_check" in extra["filter_quality"]:
            parts.append("## The synthetic captions against their scenes (caption checker; evaluation only)\n\n"
                         f"{synthetic_check_table(extra['filter_quality']['synthetic_check'])}")
    if gallery:
        rel = os.path.relpath(gallery, Path(out).parent or ".")
        parts.append(f"![CapFilt: web and synthetic texts, kept (green) and dropped (red)]({rel})\n")
        tracker.log_artifact(gallery)
    if "dataset" in extra:
        check = (extra.get("filter_quality") or {}).get("synthetic_check") or {}
        parts.append(f"## The bootstrapped dataset\n\n{dataset_table(extra['dataset'], check.get('true_noise_ratio'))}")
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
