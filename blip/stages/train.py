"""The training stages: pre-training (baseline and re-pre-training) and the fine-tunings."""

from __future__ import annotations

from ..params import Params
from ..track import Tracker
from .common import StageError, datasets, skip, skipped, write_json


def warmstart_vision(stage, params: Params, tracker: Tracker, *, out: str, metrics: str | None = None) -> dict:
    """The ViT's supervised warm start on a labelled image set of the world (the ImageNet role)."""
    ws = params.warmstart_vision
    if not ws.enabled:
        return skip(out, "warmstart_vision.enabled is false: pre-training starts from random weights", metrics)
    from ..train.warmstart import train_vision

    summary = train_vision(ws, params.model.config({}).vision, params.generate.world, out, tracker=tracker)
    held = summary["held_out"]
    if metrics:
        write_json(metrics, {k: summary[k] for k in ("steps", "final_bce", "images_per_s", "train_seconds", "bf16")}
                   | {"held_out": held} | {k: summary[k] for k in ("held_out_curve",) if k in summary})
    print("warm start held-out AUC: " + ", ".join(f"{k.split('/')[0]} {v:.3f}" for k, v in held.items()
                                                  if k.endswith("/auc")))
    return {"steps": summary["steps"], "held_out": held}


def warmstart_text(stage, params: Params, tracker: Tracker, *, tokenizer: str, out: str,
                   metrics: str | None = None) -> dict:
    """The text transformer's MLM warm start on a caption corpus of the world (the BERT role)."""
    ws = params.warmstart_text
    if not ws.enabled:
        return skip(out, "warmstart_text.enabled is false: pre-training starts its text towers from random weights",
                    metrics)
    from ..tokenizer import BlipTokenizer
    from ..train.warmstart_text import train_text

    tok = BlipTokenizer.load(tokenizer)
    cfg = params.model.config(tok.special_ids)
    summary = train_text(ws, cfg.text, cfg.encoder_width, params.generate.world, tok, out, tracker=tracker)
    held = summary["held_out"]
    if metrics:
        write_json(metrics, {k: summary[k] for k in ("steps", "final_mlm", "captions_per_s", "train_seconds", "bf16")}
                   | {"held_out": held})
    print(f"text warm start held-out: masked-token accuracy {held['mlm_accuracy']:.3f}, loss {held['mlm_loss']:.3f}")
    return {"steps": summary["steps"], "held_out": held}


def train(stage, params: Params, tracker: Tracker, *, shards: list[str], out: str, init: str | None = None,
          tokenizer: str | None = None, vision_init: str | None = None, text_init: str | None = None, metrics: str | None = None,
          log: str | None = None, plot: str | None = None) -> dict:
    """Train ``stage.section``'s job on ``shards`` into ``out``: from scratch with ``tokenizer``, or
    from the checkpoint ``init``. Writes the summary to ``metrics``, per-step JSON lines to ``log``
    and the loss curves (``dvc plots``) to ``plot``; records the model as ``stage.model_log`` says."""
    if stage.name == "finetune_shared" and params.capfilt.models != "shared":
        return skip(out, "capfilt.models is 'decoupled': the captioner and the filter are fine-tuned separately")
    from ..tokenizer import BlipTokenizer
    from ..track import CsvTracker, JsonlTracker, TeeTracker
    from ..train.trainer import train as run_training

    cfg = params.train(stage.section)
    tok = model_cfg = None
    if init is None:
        if tokenizer is None:
            raise StageError(f"{stage.name}: pass --tokenizer DIR to train from scratch, or --init MODEL_DIR")
        tok = BlipTokenizer.load(tokenizer)
        model_cfg = params.model.config(tok.special_ids)
        if vision_init is not None and (skipped(vision_init) or not params.warmstart_vision.enabled):
            vision_init = None  # warm start disabled: from random weights (the frozen stage keeps its files)
        if vision_init is not None:
            from ..train.warmstart import check_vision_init

            check_vision_init(vision_init, params.generate.world, model_cfg.vision)
        if text_init is not None and skipped(text_init):
            text_init = None
    elif skipped(init):
        raise StageError(f"{stage.name}: {init} holds no trained model (its stage was skipped)")
    engine_trackers = [tracker, *([JsonlTracker(log)] if log else []), *([CsvTracker(plot)] if plot else [])]
    tracker.log_datasets(datasets(shards, "training"))
    summary = run_training(cfg, shards, out, init=init, model_cfg=model_cfg, tokenizer=tok,
                           tracker=TeeTracker(*engine_trackers), metrics_path=metrics, vision_init=vision_init,
                           text_init=text_init)
    tracker.log_metrics({f"summary/{k}": float(summary[k]) for k in ("steps", "pairs_per_s", "seconds")
                         if summary.get(k) is not None})
    for m in stage.models:
        tracker.log_model(out, m.name, role=m.role, hf=m.hf, register=m.register)
    return {k: summary[k] for k in ("job", "steps", "final", "pairs_per_s", "seconds")}
