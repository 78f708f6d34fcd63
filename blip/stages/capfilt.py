"""The CapFilt stages (§3.3): ``caption``, ``filter``, ``assemble``, and ``filter_quality`` (the
filter measured against the generator's hidden noise labels, which the paper could not do, and the
synthetic captions checked against their images' scenes: ``evaluate.caption_check``)."""

from __future__ import annotations

from ..params import Params
from ..track import Tracker, numeric
from .common import StageError, datasets, skip, skipped, unskip, write_json


def _model(params: Params, role_dir: str | None, shared: str | None, role: str) -> str:
    """The model that plays ``role``: ``capfilt.captioner``/``capfilt.filter`` when they name a
    checkpoint (a released one), else the shared captioner+filter under ``capfilt.models:
    shared``, else the role's own fine-tuned model."""
    named = params.capfilt.captioner if role == "caption" else params.capfilt.filter
    if named:
        return named
    model = shared if params.capfilt.models == "shared" else role_dir
    if model is None or skipped(model):
        raise StageError(f"{role}: capfilt.models is {params.capfilt.models!r} but {model} holds no trained model")
    return model


def _check_skipped(summary: dict, ceiling: float, stage: str) -> None:
    from ..capfilt.config import check_skipped

    try:
        check_skipped(summary, ceiling, stage)
    except ValueError as e:
        raise StageError(str(e)) from None


def caption(stage, params: Params, tracker: Tracker, *, captioner: str, shards: list[str], out: str,
            shared: str | None = None) -> dict:
    if not params.capfilt.use_captioner:
        return skip(out, f"capfilt.parts is {params.capfilt.parts!r}: no synthetic captions")
    from ..capfilt.caption import caption_shards

    unskip(out)
    tracker.log_datasets(datasets(shards, "input"))
    summary = caption_shards(params.caption, _model(params, captioner, shared, "caption"), shards, out, tracker=tracker,
                             vocab_file=params.model.vocab_file, ray=params.compute.ray())
    _check_skipped(summary, params.caption.max_skipped_fraction, "caption")
    return summary


def filter(stage, params: Params, tracker: Tracker, *, filter: str, shards: list[str], out: str,
           shared: str | None = None, captions: str | None = None) -> dict:
    from ..capfilt.filter import score_shards

    captions = None if captions is None or skipped(captions) else captions
    tracker.log_datasets(datasets(shards, "input"))
    summary = score_shards(params.filter, _model(params, filter, shared, "filter"), shards, captions, out,
                           tracker=tracker, vocab_file=params.model.vocab_file, ray=params.compute.ray())
    _check_skipped(summary, params.filter.max_skipped_fraction, "filter")
    return summary


def assemble(stage, params: Params, tracker: Tracker, *, web: list[str], scores: str, out: str,
             human: list[str] | None = None, stats: str | None = None, gallery: str | None = None) -> dict:
    """The bootstrapped dataset; without ``human`` (your own web shards cleaned by released
    checkpoints) only the kept web and synthetic pairs."""
    from ..capfilt.assemble import assemble as assemble_shards

    human = human or []
    result = assemble_shards(params.assemble, human, web, scores, out, tracker=tracker)
    result = {k: v for k, v in result.items() if k != "run"}
    if stats:
        write_json(stats, result)
    tracker.log_metrics(numeric(result, "dataset/"))
    tracker.log_datasets([*datasets(human, "input"), *datasets(web, "input"), *datasets(out, "output")])
    if gallery:
        _gallery(params, web, scores, gallery, tracker)
    return result


def _gallery(params: Params, web: list[str], scores: str, path: str, tracker: Tracker) -> None:
    from pathlib import Path

    from ..evaluate.gallery import capfilt_gallery

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    capfilt_gallery(web, scores, path, threshold=params.assemble.threshold)
    tracker.log_artifact(path)


def filter_quality(stage, params: Params, tracker: Tracker, *, scores: str, web: list[str], out: str,
                   gallery: str | None = None) -> dict:
    from ..evaluate.filter_quality import evaluate_filter

    m = evaluate_filter(scores, web, threshold=params.assemble.threshold)
    m["synthetic_check"] = _synthetic_check(scores, web, params.assemble.threshold)
    write_json(out, m)
    tracker.log_metrics(numeric(m, "filter_quality/"))
    if gallery:
        _gallery(params, web, scores, gallery, tracker)
    return {k: m[k] for k in ("precision", "recall", "auc", "drop_rate")}


def _synthetic_check(scores: str, web: list[str], threshold: float) -> dict:
    """The caption checker's metrics of the synthetic captions (``evaluate.caption_check``), or
    ``{"absent": why}`` when there are none to check or no generated world to check them against."""
    from ..evaluate.caption_check import NoSyntheticCaptions, NotGeneratedWorld, check_synthetic

    try:
        return check_synthetic(scores, web, threshold=threshold)
    except (NoSyntheticCaptions, NotGeneratedWorld) as e:
        return {"absent": str(e)}
