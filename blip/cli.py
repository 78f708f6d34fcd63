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


def cmd_train(a, params) -> None:
    from .tokenizer import BlipTokenizer
    from .track import JsonlTracker, NullTracker
    from .train import TrainConfig, train

    name, job = TRAIN_STAGES[a.stage]
    sec = section(params, name)
    sec.setdefault("job", job)
    if sec["job"] != job and not (name == "repretrain" and sec["job"] == "pretrain"):
        raise ValueError(f"{name}.job={sec['job']!r}: the {a.stage} stage runs job {job!r}")
    cfg = build(TrainConfig, sec, name)
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
