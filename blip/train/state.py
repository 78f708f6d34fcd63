"""Resumable training state: model (with queues), optimizer, position, written atomically.

Layout of a resume directory::

    model/                 blip.checkpoint format (weights incl. queues and momentum encoders)
    optimizer.safetensors  every optimizer state tensor, keyed ``state.<param index>.<name>``
    state.json             position (epoch, step in epoch, global step), optimizer hyper-parameters,
                           the config hash it belongs to, and the RNG state

Randomness is a function of the position: the trainer reseeds torch's generator from
(seed, global step, rank) before every optimizer step and the loader seeds its shuffling and
augmentation from (seed, epoch, rank, worker). So the position *is* the RNG state and a resumed
run replays exactly what an uninterrupted one would have done; ``state.json`` also records the
torch RNG state at save time for inspection.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..checkpoint import load_weights, save_model
from ..model.blip import BlipBase


def config_hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(
    directory: str | Path,
    model: BlipBase,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    position: dict[str, int],
    cfg_hash: str,
) -> Path:
    """Write the resume directory atomically (``blip.atomic.atomic_dir``): the checkpoint appears
    whole or not at all."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    meta = {
        "position": position,
        "config_hash": cfg_hash,
        "param_groups": sd["param_groups"],
        "optimizer_scalars": scalars,
        "torch_rng_sha": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16],
    }
    with atomic_dir(directory) as tmp:
        save_model(model, tmp / "model", tokenizer=tokenizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    return Path(directory)


def read_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_state(directory: str | Path, model: BlipBase, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Restore weights, queues and optimizer in place; return the saved position."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    load_weights(model, load_file(str(directory / "model" / "model.safetensors")), strict=True)
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    for key, v in meta["optimizer_scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["position"]
