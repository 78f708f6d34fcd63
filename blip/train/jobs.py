"""How a training job (``config.JOBS``) builds its model and turns a loader batch into losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..model.blip import BlipBase, BlipPretrain
from ..model.config import BlipConfig
from ..tokenizer import BlipTokenizer
from .config import JOBS, TrainConfig


def build_model(
    cfg: TrainConfig, init: str | Path | None, model_cfg: BlipConfig | None, tokenizer: BlipTokenizer | None,
    vision_init: str | Path | None = None, text_init: str | Path | None = None,
) -> tuple[BlipBase, BlipTokenizer]:
    """A fresh pre-training model from ``model_cfg`` + ``tokenizer`` (its ViT from the warm start
    ``vision_init``, its text towers from ``text_init`` when given), or the job's model class initialised from checkpoint ``init``
    (tokenizer read from ``init/tokenizer``)."""
    model, tok = _build(cfg, init, model_cfg, tokenizer, vision_init, text_init)
    if hasattr(model, "itm_negatives"):  # models that train ITM (pre-training, filter, shared)
        model.itm_negatives = cfg.itm_negatives
        model.itm_negatives_from = cfg.itm_negatives_from
        model.itm_negatives_per_pair = cfg.itm_negatives_per_pair
    return model, tok


def _build(cfg, init, model_cfg, tokenizer, vision_init, text_init) -> tuple[BlipBase, BlipTokenizer]:
    job = JOBS[cfg.job]
    kwargs = {"negative_all_rank": cfg.negative_all_rank} if job.model == "BlipRetrieval" else {}
    if init is not None and (vision_init is not None or text_init is not None):
        raise ValueError("vision_init/text_init warm-start a model trained from scratch; a checkpoint init has its own")
    if init is not None:  # at cfg.image_size when set: pos_embed interpolated (BLIP's 224 -> 384 fine-tuning)
        model = load_model(init, arch=job.model, image_size=cfg.image_size, **kwargs)
        tok = tokenizer or BlipTokenizer.load(Path(init) / "tokenizer")
        return model, tok
    if not job.from_scratch:
        raise ValueError(f"job {cfg.job!r} fine-tunes a checkpoint: pass init=<pre-trained model dir>")
    if model_cfg is None or tokenizer is None:
        raise ValueError(f"job {cfg.job!r} trains from scratch: it needs a model config and a tokenizer")
    if model_cfg.text.vocab_size != len(tokenizer):
        raise ValueError(
            f"model text.vocab_size={model_cfg.text.vocab_size} but the tokenizer has {len(tokenizer)} tokens; "
            "build the config with load_preset(..., text=tokenizer.special_ids)"
        )
    if cfg.image_size is not None and cfg.image_size != model_cfg.vision.image_size:
        model_cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, image_size=cfg.image_size))
    model = BlipPretrain(model_cfg)
    if vision_init is not None:
        from .warmstart import load_vision_init

        load_vision_init(model, vision_init)
    if text_init is not None:
        from .warmstart_text import load_text_init

        load_text_init(model, text_init)
    return model, tokenizer


def compute_losses(
    cfg: TrainConfig, model, batch: dict, tok: BlipTokenizer, alpha: float, device: torch.device
) -> dict[str, torch.Tensor]:
    """Run the job's forward pass on a loader batch; returns the loss terms."""
    objective = JOBS[cfg.job].objective
    image = batch["image"].to(device, non_blocking=True)
    prompt = _unwrap(model).cfg.prompt
    if objective == "lm":  # "a picture of " + caption, the prompt not supervised
        text = tok([prompt + t for t in batch["text"]], max_length=cfg.max_text_len)
        return model(image, text.input_ids.to(device), text.attention_mask.to(device),
                     prompt_length=len(tok.prompt_ids(prompt)))
    text = tok(batch["text"], max_length=cfg.max_text_len)
    ids, mask = text.input_ids.to(device), text.attention_mask.to(device)
    if objective == "pretrain":
        return model(image, ids, mask, alpha=alpha)
    idx = batch["image_id"].to(device)
    if objective == "retrieval":
        return model(image, ids, mask, idx=idx, alpha=alpha)
    dec = tok([prompt + t for t in batch["text"]], max_length=cfg.max_text_len)  # shared: LM + ITC + ITM
    return model(image, ids, mask, alpha=alpha, idx=idx, decoder_input_ids=dec.input_ids.to(device),
                 decoder_attention_mask=dec.attention_mask.to(device), prompt_length=len(tok.prompt_ids(prompt)))


def _unwrap(model):
    return model.module if hasattr(model, "module") else model
