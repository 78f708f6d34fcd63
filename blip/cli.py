"""Stage commands: ``python -m blip <stage> ...``; each reads its section of ``params.yaml``.

Every stage is one library call with explicit inputs and outputs, so ``dvc.yaml`` commands,
Prefect tasks and tests run the same code. Multi-GPU: ``torchrun --nproc_per_node N -m blip
pretrain ...`` (the trainer joins the process group torchrun describes).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import ParamsError, build, load_params, section

TRAIN_STAGES = {  # stage -> (params section, job)
    "pretrain": ("pretrain", "pretrain"),
    "finetune_captioner": ("finetune_captioner", "finetune_captioner"),
    "finetune_filter": ("finetune_filter", "finetune_filter"),
    "finetune_retrieval": ("finetune_retrieval", "finetune_retrieval"),
    "finetune_shared": ("finetune_shared", "finetune_shared"),
    "repretrain": ("repretrain", "pretrain"),
}


@dataclass
class ModelParams:
    """``model:`` section — the architecture pre-training builds (fine-tunings inherit it)."""

    preset: str = "tiny"
    sharing: str = "all_except_sa"  # Table 3: all | all_except_ca | all_except_sa | none
    queue_size: int = 1024
    vocab_size: int = 1024  # WordPiece vocabulary trained on the captions (ignored with vocab_file)
    vocab_file: str | None = None  # a BERT vocab.txt to use instead (e.g. bert-base-uncased)
    vision: dict = field(default_factory=dict)  # overrides of the preset's vision fields
    text: dict = field(default_factory=dict)  # overrides of the preset's text fields

    def __post_init__(self) -> None:
        from .model import PRESETS, SHARING_STRATEGIES

        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} unknown; use one of {PRESETS}")
        if self.sharing not in SHARING_STRATEGIES:
            raise ValueError(f"sharing={self.sharing!r} unknown; use one of {SHARING_STRATEGIES}")


def model_config(params: dict[str, Any], tokenizer):
    from .model import load_preset

    mp = build(ModelParams, section(params, "model"), "model")
    return load_preset(
        mp.preset, sharing=mp.sharing, queue_size=mp.queue_size, vision=mp.vision,
        text={**mp.text, **tokenizer.special_ids},
    )


def cmd_tokenizer(a, params) -> None:
    from .data import caption_corpus
    from .tokenizer import build_tokenizer, load_vocab

    mp = build(ModelParams, section(params, "model"), "model")
    tok = load_vocab(mp.vocab_file) if mp.vocab_file else build_tokenizer(caption_corpus(a.shards), mp.vocab_size)
    tok.save(a.out)
    print(f"tokenizer with {len(tok)} tokens -> {a.out}")


def train_config(params: dict[str, Any], stage: str, sec_name: str | None = None):
    """The ``TrainConfig`` of a training stage; ``sec_name`` reads another section (e.g. the
    CapFilt model's downstream fine-tuning reuses the baseline's recipe)."""
    from .train import TrainConfig

    name, job = TRAIN_STAGES[stage]
    sec_name = sec_name or name
    sec = section(params, sec_name)
    sec.setdefault("job", job)
    if sec["job"] != job:
        raise ParamsError(f"{sec_name}.job={sec['job']!r}: the {stage} stage runs job {job!r}")
    return build(TrainConfig, sec, sec_name)


def cmd_train(a, params) -> None:
    from .tokenizer import BlipTokenizer
    from .track import JsonlTracker, NullTracker
    from .train import train

    cfg = train_config(params, a.stage)
    build(ModelParams, section(params, "model"), "model")  # fail on a bad model section before any work
    tok = model_cfg = None
    if a.init is None:
        if a.tokenizer is None:
            raise SystemExit(f"{a.stage}: pass --tokenizer DIR to train from scratch, or --init MODEL_DIR")
        tok = BlipTokenizer.load(a.tokenizer)
        model_cfg = model_config(params, tok)
    tracker = JsonlTracker(a.log) if a.log else NullTracker()
    summary = train(cfg, a.shards, a.out, init=a.init, model_cfg=model_cfg, tokenizer=tok, tracker=tracker,
                    metrics_path=a.metrics)
    print(json.dumps({k: summary[k] for k in ("job", "steps", "final", "pairs_per_s", "seconds")}))


@dataclass
class EvaluateParams:
    """``evaluate:`` section — downstream evaluation of a fine-tuned model pair."""

    k_test: int = 128  # ITC candidates reranked by ITM (BLIP: 256 COCO, 128 Flickr)
    retrieval_splits: list = field(default_factory=lambda: ["test", "zeroshot"])
    caption_split: str = "test"
    batch_size: int = 64
    meteor: str = "auto"  # auto | on | off (METEOR needs Java)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.meteor not in ("auto", "on", "off"):
            raise ValueError(f"meteor={self.meteor!r}: use auto, on or off")


def _write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def cmd_caption(a, params) -> None:
    from .capfilt import CaptionConfig, caption_shards

    cfg = build(CaptionConfig, section(params, "caption"), "caption")
    print(json.dumps(caption_shards(cfg, a.captioner, a.shards, a.out), default=str))


def cmd_filter(a, params) -> None:
    from .capfilt import FilterConfig, score_shards

    cfg = build(FilterConfig, section(params, "filter"), "filter")
    print(json.dumps(score_shards(cfg, a.filter, a.shards, a.captions, a.out), default=str))


def cmd_assemble(a, params) -> None:
    from .capfilt import AssembleConfig, assemble

    cfg = build(AssembleConfig, section(params, "assemble"), "assemble")
    stats = assemble(cfg, a.human, a.web, a.scores, a.out)
    if a.stats:
        _write_json(a.stats, stats)
    print(json.dumps({k: v for k, v in stats.items() if k != "run"}, default=str))


def cmd_evaluate(a, params) -> None:
    from .checkpoint import load_model
    from .data import gt_path
    from .dist import resolve_device
    from .evaluate import evaluate_captioning, evaluate_retrieval

    ev = build(EvaluateParams, section(params, "evaluate"), "evaluate")
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
        meteor = {"auto": "auto", "on": True, "off": False}[ev.meteor]
        m, preds = evaluate_captioning(model, _tokenizer_of(a.captioner), Path(a.data) / ev.caption_split,
                                       gt_path(str(a.data), ev.caption_split), batch_size=ev.batch_size,
                                       device=device, meteor=meteor)
        metrics.update({f"{ev.caption_split}/{k}": v for k, v in m.items()})
        if a.predictions:
            _write_json(a.predictions, preds)
    _write_json(a.out, metrics)
    print(json.dumps(metrics, default=str))


def cmd_filter_quality(a, params) -> None:
    from .evaluate import evaluate_filter

    sel = section(params, "assemble") if "assemble" in params else {}
    m = evaluate_filter(a.scores, a.web, threshold=sel.get("threshold", 0.5))
    _write_json(a.out, m)
    print(json.dumps({k: m[k] for k in ("precision", "recall", "auc", "drop_rate")}, default=str))


def cmd_report(a, params) -> None:
    from .evaluate import metrics_table

    runs = {}
    for item in a.metrics:
        name, _, path = item.partition("=")
        runs[name] = json.loads(Path(path).read_text())
    parts = [f"# Bootstrap report\n\n## Downstream metrics\n\n{metrics_table(runs)}\n"]
    for title, path in (("Bootstrapped dataset", a.dataset_stats), ("Filter quality (hidden noise labels)",
                                                                     a.filter_quality)):
        if path:
            parts.append(f"## {title}\n\n{metrics_table({'value': json.loads(Path(path).read_text())})}\n")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(parts))
    print("\n".join(parts))


def _tokenizer_of(model_dir):
    from .tokenizer import BlipTokenizer

    return BlipTokenizer.load(Path(model_dir) / "tokenizer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter (repeatable), e.g. --set pretrain.epochs=2")
        return sp

    t = stage("tokenizer", "build the WordPiece tokenizer from the caption corpus (section: model)")
    t.add_argument("--shards", nargs="+", required=True, help="shard folders/patterns whose captions to use")
    t.add_argument("--out", required=True, help="output folder")
    t.set_defaults(func=cmd_tokenizer)

    for name, (sec, job) in TRAIN_STAGES.items():
        tp = stage(name, f"train job {job!r} (section: {sec}; model architecture: section model)")
        tp.add_argument("--shards", nargs="+", required=True, help="training shard folders/patterns")
        tp.add_argument("--out", required=True, help="folder for the trained model (+ tokenizer)")
        tp.add_argument("--init", default=None, help="model folder to start from (fine-tuning)")
        tp.add_argument("--tokenizer", default=None, help="tokenizer folder (training from scratch)")
        tp.add_argument("--metrics", default=None, help="write the run summary JSON here")
        tp.add_argument("--log", default=None, help="append per-step metrics as JSON lines here")
        tp.set_defaults(func=cmd_train)

    c = stage("caption", "one synthetic caption per web image (section: caption)")
    c.add_argument("--captioner", required=True, help="fine-tuned captioner folder")
    c.add_argument("--shards", nargs="+", required=True, help="web shard folders/patterns")
    c.add_argument("--out", required=True, help="folder of per-shard caption tables (parquet)")
    c.set_defaults(func=cmd_caption)

    f = stage("filter", "ITM/ITC scores of every web and synthetic text (section: filter)")
    f.add_argument("--filter", required=True, help="fine-tuned filter folder")
    f.add_argument("--shards", nargs="+", required=True, help="web shard folders/patterns")
    f.add_argument("--captions", default=None, help="the caption stage's output (omit: web texts only)")
    f.add_argument("--out", required=True, help="folder of per-shard score tables (parquet)")
    f.set_defaults(func=cmd_filter)

    s = stage("assemble", "human + kept web + kept synthetic pairs -> new shards (section: assemble)")
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

    r = stage("report", "side-by-side markdown report of metric files")
    r.add_argument("--metrics", nargs="+", required=True, metavar="NAME=PATH")
    r.add_argument("--dataset-stats", default=None)
    r.add_argument("--filter-quality", default=None)
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="generate a small world, pre-train the tiny model, print captions")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)

    a = p.parse_args(argv)
    if a.stage == "demo":
        from .demo import run_demo

        run_demo(a.out, a.steps, a.batch_size, a.seed)
        return 0
    try:
        params = load_params(a.params, a.overrides)
        a.func(a, params)
    except (ParamsError, FileNotFoundError) as e:
        p.exit(2, f"python -m blip {a.stage}: error: {e}\n")
    return 0
