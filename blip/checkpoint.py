"""Model checkpoints: a directory with ``config.json`` + ``model.safetensors`` (+ ``tokenizer/``).

Never pickle. Keys are the official BLIP names. Tensors shared inside the model (tied
encoder/decoder layers, the LM head tied to the word embeddings) are written under every name
they have, as the official checkpoints do, so each key loads on its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .model.blip import MODEL_CLASSES, BlipBase
from .model.config import BlipConfig
from .model.vit import interpolate_pos_embed

FORMAT = "blip-bootstrap/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with every tensor owning its storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return {k: v.cpu() for k, v in out.items()}


def save_model(
    model: BlipBase, directory: str | Path, tokenizer=None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``directory`` atomically (``blip.atomic.atomic_dir``:
    a crash leaves either the old or the new checkpoint)."""
    directory = Path(directory)
    meta = {"format": FORMAT, "arch": type(model).__name__, "config": model.cfg.to_dict(), **(metadata or {})}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
        # one metadata key: safetensors writes its metadata map in a per-process random order, so two
        # keys would make the same weights different bytes (and DVC hashes) from run to run
        save_file(state_dict_for_save(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
    return directory


def read_config(directory: str | Path) -> tuple[str, BlipConfig]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a blip-bootstrap checkpoint directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta["arch"], BlipConfig.from_dict(meta["config"])


def load_model(directory: str | Path, arch: str | None = None, strict: bool = True, image_size: int | None = None,
               **model_kwargs) -> BlipBase:
    """Build the model saved in ``directory`` (or as ``arch``, e.g. a captioner from a pre-trained
    checkpoint: towers the target lacks are dropped, towers it has but the file lacks are
    reported). ``image_size``: build it for another input size (the position embeddings are
    interpolated, as BLIP does going from 224-px pre-training to 384-px fine-tuning)."""
    saved_arch, cfg = read_config(directory)
    if image_size is not None and image_size != cfg.vision.image_size:
        if image_size % cfg.vision.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of {directory}'s patch size "
                             f"{cfg.vision.patch_size}")
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_size))
    arch = arch or saved_arch
    if arch not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {arch!r}; known: {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[arch](cfg, **model_kwargs)
    state = load_file(str(Path(directory) / WEIGHTS))
    report = load_weights(model, state, strict=strict and arch == saved_arch)
    model.load_report = report
    return model


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> dict[str, list[str]]:
    """Copy ``state`` into ``model`` by name.

    ``pos_embed`` tensors are interpolated when the image size changed; other shape mismatches
    raise, naming the key. Returns ``{"missing": [...], "unexpected": [...]}``; with ``strict``
    either list being non-empty raises.
    """
    own = model.state_dict()
    state = dict(state)
    for k in list(state):
        if k not in own:
            continue
        if k.endswith("pos_embed") and state[k].shape != own[k].shape:
            state[k] = interpolate_pos_embed(state[k], own[k].shape[1])
        if state[k].shape != own[k].shape:
            raise ValueError(
                f"checkpoint key {k!r} has shape {tuple(state[k].shape)} but the model expects "
                f"{tuple(own[k].shape)}: the checkpoint was made with another config"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}
