"""The training stages: pre-training (baseline and re-pre-training) and the fine-tunings."""

from __future__ import annotations

from ..params import Params
from ..track import Tracker
from .common import StageError, datasets, skip, skipped


def train(stage, params: Params, tracker: Tracker, *, shards: list[str], out: str, init: str | None = None,
          tokenizer: str | None = None, metrics: str | None = None, log: str | None = None,
          plot: str | None = None) -> dict:
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
    elif skipped(init):
        raise StageError(f"{stage.name}: {init} holds no trained model (its stage was skipped)")
    engine_trackers = [tracker, *([JsonlTracker(log)] if log else []), *([CsvTracker(plot)] if plot else [])]
    tracker.log_datasets(datasets(shards, "training"))
    summary = run_training(cfg, shards, out, init=init, model_cfg=model_cfg, tokenizer=tok,
                           tracker=TeeTracker(*engine_trackers), metrics_path=metrics)
    tracker.log_metrics({f"summary/{k}": float(summary[k]) for k in ("steps", "pairs_per_s", "seconds")
                         if summary.get(k) is not None})
    for m in stage.models:
        tracker.log_model(out, m.name, role=m.role, hf=m.hf, register=m.register)
    return {k: summary[k] for k in ("job", "steps", "final", "pairs_per_s", "seconds")}
