"""Load the captioner and the filter for inference: device choice, eval mode, shared tokenizer.

The captioner is any checkpoint with a text decoder (a fine-tuned ``BlipCaptioner``, or a
``BlipPretrain``/"shared" model, loaded as a captioner so its ITC/ITM towers and queues stay on
disk); the filter is any checkpoint with the ITC/ITM towers (``BlipRetrieval`` fine-tuned on the
human pairs — the maintainer's "filter = retrieval model", blip-facts §1.17 — or ``BlipPretrain``
for Table 4's shared setting). The tokenizer is the one saved beside the weights.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..checkpoint import load_model, read_config
from ..dist import resolve_device
from ..model.blip import BlipBase
from ..tokenizer import BlipTokenizer
from .fingerprint import dir_fingerprint

CAPTIONER_ARCHS = {"BlipCaptioner": "BlipCaptioner", "BlipPretrain": "BlipCaptioner"}
FILTER_ARCHS = {"BlipRetrieval": "BlipRetrieval", "BlipPretrain": "BlipPretrain"}


class InferenceModel:
    """A model in eval mode on its device, its tokenizer, and a lock for the tokenizer.

    The lock: a ``tokenizers`` fast tokenizer is not safe to call from several threads at once
    (it mutates its truncation/padding state: "Already borrowed"), while the model is — so
    pooled threads share one model and take turns only for the (cheap) tokenizer calls.
    """

    def __init__(self, directory: str | Path, role: str, device: str = "auto"):
        directory = Path(directory)
        archs = CAPTIONER_ARCHS if role == "captioner" else FILTER_ARCHS
        saved, _ = read_config(directory)
        if saved not in archs:
            need = "text decoder" if role == "captioner" else "ITC/ITM heads"
            raise ValueError(f"{directory} holds a {saved}, which has no {need}; the {role} must be one of "
                             f"{sorted(archs)} (fine-tune it with the finetune_{'captioner' if role == 'captioner' else 'filter'} job)")
        tok_dir = directory / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            raise FileNotFoundError(f"{directory} has no tokenizer/ folder; save the model with "
                                    "blip.checkpoint.save_model(model, dir, tokenizer=tok)")
        self.device = resolve_device(device)
        self.model: BlipBase = load_model(directory, arch=archs[saved]).to(self.device).eval()
        self.tokenizer = BlipTokenizer.load(tok_dir)
        self.lock = threading.Lock()
        self.image_size = self.model.cfg.vision.image_size

    def tokenize(self, texts: list[str], max_length: int):
        with self.lock:
            t = self.tokenizer(texts, max_length=max_length)
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def decode(self, ids: torch.Tensor) -> list[str]:
        with self.lock:
            return self.tokenizer.batch_decode(ids.cpu())


def model_fingerprint(directory: str | Path) -> str:
    """Content hash of a checkpoint folder (weights, config, tokenizer): retrained model, new results."""
    return dir_fingerprint(directory)
