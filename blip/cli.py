"""Stage commands: ``python -m blip <stage> ...``; each reads its section of ``params.yaml``.

Every stage is one library call with explicit inputs and outputs, so ``dvc.yaml`` commands,
Prefect tasks and tests run the same code. Multi-GPU: ``torchrun --nproc_per_node N -m blip
pretrain ...`` (the trainer joins the process group torchrun describes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .params import ParamsError, load_params
from .schema import (
    TRAIN_SECTIONS,
    assemble_config,
    capfilt,
    caption_config,
    compute_params,
    evaluate_params,
    filter_config,
    generate_config,
    model_params,
    train_config,
    validate,
)

__all__ = ["STAGES", "main", "model_config"]

TRAIN_STAGES = {  # stage -> params section (which implies the job)
    **{name: name for name in TRAIN_SECTIONS},
    "downstream_captioner": "finetune_captioner",  # the CapFilt model fine-tuned as the baseline's captioner
    "downstream_retrieval": "finetune_filter",  # ... and as the baseline's filter (same recipe, same data)
}
SKIPPED = "SKIPPED.json"  # marker a stage writes into its output folder when a factor switches it off


def model_config(params: dict[str, Any], tokenizer):
    from .model import load_preset

    mp = model_params(params)
    return load_preset(
        mp.preset, sharing=mp.sharing, queue_size=mp.queue_size, vision=mp.vision,
        text={**mp.text, **tokenizer.special_ids},
    )


def _skip(out, reason: str) -> None:
    """Write an output folder that says why this stage had nothing to do (DVC still versions it)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    Path(out).mkdir(parents=True)
    _write_json(Path(out) / SKIPPED, {"skipped": reason})
    print(f"skipped: {reason}")


def skipped(path) -> bool:
    return path is not None and (Path(path) / SKIPPED).is_file()


def cmd_data(a, params, tracker) -> None:
    from .data import generate

    manifest = generate(generate_config(params), a.out, progress=False)
    counts = {f"data/{split}/{k}": float(v[k]) for split, v in manifest["splits"].items() for k in ("images", "pairs")
              if k in v}
    if "noise_summary" in manifest:
        counts["data/web/noise_rate"] = float(manifest["noise_summary"]["rate"])
    tracker.log_metrics(counts)
    print(json.dumps(counts))


def cmd_tokenizer(a, params, tracker) -> None:
    from .data import caption_corpus
    from .tokenizer import build_tokenizer, load_vocab

    mp = model_params(params)
    tok = load_vocab(mp.vocab_file) if mp.vocab_file else build_tokenizer(caption_corpus(a.shards), mp.vocab_size)
    tok.save(a.out)
    tracker.log_metrics({"tokenizer/size": float(len(tok))})
    print(f"tokenizer with {len(tok)} tokens -> {a.out}")


def cmd_train(a, params, tracker) -> None:
    from .tokenizer import BlipTokenizer
    from .track import CsvTracker, JsonlTracker, TeeTracker
    from .train import train

    cfg = train_config(params, TRAIN_STAGES[a.stage])
    if a.stage == "finetune_shared" and a.skip_unless_shared and capfilt(params).models != "shared":
        _skip(a.out, "capfilt.models is 'decoupled': the captioner and the filter are fine-tuned separately")
        return
    tok = model_cfg = None
    if a.init is None:
        if a.tokenizer is None:
            raise SystemExit(f"{a.stage}: pass --tokenizer DIR to train from scratch, or --init MODEL_DIR")
        tok = BlipTokenizer.load(a.tokenizer)
        model_cfg = model_config(params, tok)
    trackers = [tracker]
    if a.log:
        trackers.append(JsonlTracker(a.log))
    if a.plot:
        trackers.append(CsvTracker(a.plot))
    summary = train(cfg, a.shards, a.out, init=a.init, model_cfg=model_cfg, tokenizer=tok,
                    tracker=TeeTracker(*trackers), metrics_path=a.metrics)
    tracker.log_metrics({f"summary/{k}": float(summary[k]) for k in ("steps", "pairs_per_s", "seconds")
                         if summary.get(k) is not None})
    if a.log_model:
        tracker.log_model_dir(a.out, "model", hf=a.hf)
    print(json.dumps({k: summary[k] for k in ("job", "steps", "final", "pairs_per_s", "seconds")}))


def _write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keys joined with '/'."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def cmd_caption(a, params, tracker) -> None:
    from .capfilt import caption_shards

    cf = capfilt(params)
    if not cf.use_captioner:
        _skip(a.out, f"capfilt.parts is {cf.parts!r}: no synthetic captions")
        return
    model = a.shared if cf.models == "shared" else a.captioner
    if model is None or skipped(model):
        raise SystemExit(f"caption: capfilt.models is {cf.models!r} but {model} holds no trained model")
    summary = caption_shards(caption_config(params), model, a.shards, a.out, tracker=tracker)
    print(json.dumps(summary, default=str))


def cmd_filter(a, params, tracker) -> None:
    from .capfilt import score_shards

    cf = capfilt(params)
    model = a.shared if cf.models == "shared" else a.filter
    if model is None or skipped(model):
        raise SystemExit(f"filter: capfilt.models is {cf.models!r} but {model} holds no trained model")
    captions = None if a.captions is None or skipped(a.captions) else a.captions
    summary = score_shards(filter_config(params), model, a.shards, captions, a.out, tracker=tracker)
    print(json.dumps(summary, default=str))


def cmd_assemble(a, params, tracker) -> None:
    from .capfilt import assemble

    stats = assemble(assemble_config(params), a.human, a.web, a.scores, a.out)
    if a.stats:
        _write_json(a.stats, {k: v for k, v in stats.items() if k != "run"})
    tracker.log_metrics(_numbers({k: v for k, v in stats.items() if k != "run"}, "dataset/"))
    print(json.dumps({k: v for k, v in stats.items() if k != "run"}, default=str))


def cmd_evaluate(a, params, tracker) -> None:
    from .checkpoint import load_model
    from .data import gt_path
    from .dist import resolve_device
    from .evaluate import evaluate_captioning, evaluate_retrieval

    ev = evaluate_params(params)
    device = resolve_device(ev.device)
    metrics: dict = {}
    if a.retrieval:
        model = load_model(a.retrieval).to(device)
        tok = _tokenizer_of(a.retrieval)
        for split in ev.retrieval_splits:
            r = evaluate_retrieval(model, tok, Path(a.data) / split, k=ev.k_test, batch_size=ev.batch_size,
                                   device=device)
            metrics.update({f"{split}/{k}": v for k, v in r.items()})
    if a.captioner:
        model = load_model(a.captioner).to(device)
        m, preds = evaluate_captioning(model, _tokenizer_of(a.captioner), Path(a.data) / ev.caption_split,
                                       gt_path(str(a.data), ev.caption_split), batch_size=ev.batch_size,
                                       device=device, meteor=ev.meteor)
        metrics.update({f"{ev.caption_split}/{k}": v for k, v in m.items()})
        if a.predictions:
            _write_json(a.predictions, preds)
            tracker.log_artifact(a.predictions, "predictions")
    _write_json(a.out, metrics)
    tracker.log_metrics(_numbers(metrics))
    print(json.dumps(metrics, default=str))


def cmd_filter_quality(a, params, tracker) -> None:
    from .evaluate import evaluate_filter

    m = evaluate_filter(a.scores, a.web, threshold=assemble_config(params).threshold)
    _write_json(a.out, m)
    tracker.log_metrics(_numbers(m, "filter_quality/"))
    print(json.dumps({k: m[k] for k in ("precision", "recall", "auc", "drop_rate")}, default=str))


def _dataset_md5(lock_path: Path, out: str) -> str | None:
    """The md5 ``dvc.lock`` records for output ``out`` (the bootstrapped dataset's version)."""
    import yaml

    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if o.get("path", "").rstrip("/") == out.rstrip("/"):
                return o.get("md5")
    return None


def cmd_report(a, params, tracker) -> None:
    from .evaluate import metrics_table

    runs = {}
    for item in a.metrics:
        name, _, path = item.partition("=")
        runs[name] = json.loads(Path(path).read_text())
    parts = [f"# Bootstrap report\n\n{_factors_line(params)}\n\n## Downstream metrics\n\n{metrics_table(runs)}\n"]
    extra: dict[str, dict] = {}
    for key, title, path in (("dataset", "Bootstrapped dataset", a.dataset_stats),
                             ("filter_quality", "Filter quality (hidden noise labels)", a.filter_quality)):
        if path:
            extra[key] = json.loads(Path(path).read_text())
            parts.append(f"## {title}\n\n{metrics_table({'value': extra[key]})}\n")
    md5 = _dataset_md5(Path(a.lock), a.dataset) if a.dataset else None
    times = tracker.stage_durations()
    if times:
        rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in times.items())
        parts.append(f"## Stage wall time (MLflow child runs of this bootstrap, s)\n\n| stage | s |\n|---|---:|\n{rows}\n"
                     f"| total | {sum(times.values()):.1f} |\n")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(parts))
    if a.json:
        _write_json(a.json, {**runs, **extra, "dataset_md5": md5})
    tracker.log_parent_metrics({**_numbers(runs), **_numbers(extra)})
    if md5:
        tracker.set_parent_tags({"dvc.dataset_md5": md5})
    tracker.log_artifact(a.out)
    print("\n".join(parts))


def _factors_line(params) -> str:
    cf = capfilt(params)
    return (f"CapFilt parts **{cf.parts}**, decoding **{cf.decoding}**, captioner/filter **{cf.models}**, "
            f"pre-training sharing **{model_params(params).sharing}**, preset **{model_params(params).preset}**.")


def cmd_params(a, params, tracker) -> None:
    from .pipeline import paramsfile

    if a.variant:
        paramsfile.apply_variant(a.params, a.variant)
        print(f"{a.params}: variant {a.variant!r} applied")
    print(f"{a.params}: valid")


def _tokenizer_of(model_dir):
    from .tokenizer import BlipTokenizer

    return BlipTokenizer.load(Path(model_dir) / "tokenizer")


STAGE_SECTIONS = {  # stage -> params sections its MLflow child run records
    "data": ["generate", "data"], "tokenizer": ["model"],
    **{stage: ["model", sec, "compute"] for stage, sec in TRAIN_STAGES.items()},
    "caption": ["caption", "capfilt"], "filter": ["filter", "capfilt"], "assemble": ["assemble", "capfilt"],
    "evaluate": ["evaluate", "data"], "filter_quality": ["assemble"], "report": ["capfilt"],
}
STAGES = list(STAGE_SECTIONS)


def _nproc(params) -> int:
    n = compute_params(params).nproc_per_node
    if n == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    return int(n)


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this very command as ``torchrun --nproc_per_node N -m blip ...`` (one process per GPU)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "blip",
           *argv]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m blip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter for this call only (repeatable), e.g. --set pretrain.epochs=2; "
                             "pipeline runs change params.yaml instead (dvc exp run -S), so dvc.lock stays true")
        sp.add_argument("--run-name", default=None, help="MLflow child run name (default: the stage)")
        return sp

    d = stage("data", "generate the embedded world's splits (section: generate)")
    d.add_argument("--out", default="data/generated", help="output folder (default: data/generated)")
    d.set_defaults(func=cmd_data)

    t = stage("tokenizer", "build the WordPiece tokenizer from the caption corpus (section: model)")
    t.add_argument("--shards", nargs="+", required=True, help="shard folders/patterns whose captions to use")
    t.add_argument("--out", required=True, help="output folder")
    t.set_defaults(func=cmd_tokenizer)

    for name, sec in TRAIN_STAGES.items():
        tp = stage(name, f"train job {TRAIN_SECTIONS[sec]!r} (section: {sec}; architecture: section model; "
                         f"processes: compute.nproc_per_node)")
        tp.add_argument("--shards", nargs="+", required=True, help="training shard folders/patterns")
        tp.add_argument("--out", required=True, help="folder for the trained model (+ tokenizer)")
        tp.add_argument("--init", default=None, help="model folder to start from (fine-tuning)")
        tp.add_argument("--tokenizer", default=None, help="tokenizer folder (training from scratch)")
        tp.add_argument("--metrics", default=None, help="write the run summary JSON here")
        tp.add_argument("--log", default=None, help="append per-step metrics as JSON lines here")
        tp.add_argument("--plot", default=None, help="write per-step losses as CSV here (dvc plots)")
        tp.add_argument("--log-model", action="store_true", help="log the final checkpoint to MLflow")
        tp.add_argument("--hf", action="store_true", help="with --log-model: also the transformers-format captioner")
        if name == "finetune_shared":
            tp.add_argument("--skip-unless-shared", action="store_true",
                            help="do nothing (write a SKIPPED.json marker) unless capfilt.models is shared")
        tp.set_defaults(func=cmd_train)

    c = stage("caption", "one synthetic caption per web image (sections: caption, capfilt)")
    c.add_argument("--captioner", required=True, help="fine-tuned captioner folder")
    c.add_argument("--shared", default=None, help="the shared captioner+filter (used when capfilt.models=shared)")
    c.add_argument("--shards", nargs="+", required=True, help="web shard folders/patterns")
    c.add_argument("--out", required=True, help="folder of per-shard caption tables (parquet)")
    c.set_defaults(func=cmd_caption)

    f = stage("filter", "ITM/ITC scores of every web and synthetic text (sections: filter, capfilt)")
    f.add_argument("--filter", required=True, help="fine-tuned filter folder")
    f.add_argument("--shared", default=None, help="the shared captioner+filter (used when capfilt.models=shared)")
    f.add_argument("--shards", nargs="+", required=True, help="web shard folders/patterns")
    f.add_argument("--captions", default=None, help="the caption stage's output (omit: web texts only)")
    f.add_argument("--out", required=True, help="folder of per-shard score tables (parquet)")
    f.set_defaults(func=cmd_filter)

    s = stage("assemble", "human + kept web + kept synthetic pairs -> new shards (sections: assemble, capfilt)")
    s.add_argument("--human", nargs="+", required=True)
    s.add_argument("--web", nargs="+", required=True)
    s.add_argument("--scores", required=True, help="the filter stage's output")
    s.add_argument("--out", required=True, help="folder for the bootstrapped shards")
    s.add_argument("--stats", default=None, help="also write the dataset statistics JSON here")
    s.set_defaults(func=cmd_assemble)

    e = stage("evaluate", "retrieval (fine-tuned + zero-shot) and captioning metrics (section: evaluate)")
    e.add_argument("--retrieval", default=None, help="fine-tuned retrieval model folder")
    e.add_argument("--captioner", default=None, help="fine-tuned captioner folder")
    e.add_argument("--data", required=True, help="data root with the eval splits and annotations/")
    e.add_argument("--out", required=True, help="metrics JSON")
    e.add_argument("--predictions", default=None, help="also write the generated captions here")
    e.set_defaults(func=cmd_evaluate)

    q = stage("filter_quality", "the filter against the generator's hidden noise labels")
    q.add_argument("--scores", required=True)
    q.add_argument("--web", nargs="+", required=True)
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_filter_quality)

    r = stage("report", "side-by-side markdown report of metric files; ends the MLflow bootstrap run")
    r.add_argument("--metrics", nargs="+", required=True, metavar="NAME=PATH")
    r.add_argument("--dataset-stats", default=None)
    r.add_argument("--filter-quality", default=None)
    r.add_argument("--dataset", default=None, help="the bootstrapped dataset folder (its dvc.lock md5 is tagged)")
    r.add_argument("--lock", default="dvc.lock")
    r.add_argument("--json", default=None, help="also write all numbers as one JSON here")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_report)

    pp = stage("params", "validate params.yaml (every section); --variant NAME overlays params-NAME.yaml in place")
    pp.add_argument("--variant", default=None, help="e.g. smoke (CI): writes params-smoke.yaml's keys into --params")
    pp.set_defaults(func=cmd_params)

    dm = sub.add_parser("demo", help="generate a small world, pre-train the tiny model, print captions")
    dm.add_argument("--out", default="out/demo")
    dm.add_argument("--steps", type=int, default=300)
    dm.add_argument("--batch-size", type=int, default=32)
    dm.add_argument("--seed", type=int, default=0)

    a = p.parse_args(argv)
    if a.stage == "demo":
        from .demo import run_demo

        run_demo(a.out, a.steps, a.batch_size, a.seed)
        return 0
    try:
        params = load_params(a.params, a.overrides)
        if a.stage == "params":
            a.func(a, params, None)
            return 0
        validate(params)
        if a.stage in TRAIN_STAGES and "LOCAL_RANK" not in os.environ and (n := _nproc(params)) > 1:
            return _relaunch_under_torchrun(n, argv)
        from .pipeline import tracking

        root = Path(a.params).resolve().parent
        with tracking.stage_run(root, params, a.run_name or a.stage, STAGE_SECTIONS[a.stage]) as tracker:
            a.func(a, params, tracker)
    except (ParamsError, FileNotFoundError) as e:
        p.exit(2, f"python -m blip {a.stage}: error: {e}\n")
    return 0
