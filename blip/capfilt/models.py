"""Load the captioner and the filter for inference: device choice, eval mode, shared tokenizer.

The captioner is any checkpoint with a text decoder (a fine-tuned ``BlipCaptioner``, or a
``BlipPretrain``/"shared" model, loaded as a captioner so its ITC/ITM towers and queues stay on
disk); the filter is any checkpoint with the ITC/ITM towers (``BlipRetrieval`` fine-tuned on the
human pairs — the maintainer's "filter = retrieval model", blip-facts §1.17 — or ``BlipPretrain``
for Table 4's shared setting), or a released BLIP checkpoint (``sources.py``: an official ``.pth``
or a transformers folder). The tokenizer is the one saved beside the weights (or ``vocab_file``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..dist import resolve_device
from ..model.blip import BlipBase
from .fingerprint import content_hash, dir_fingerprint
from .sources import load_source


class InferenceModel:
    """A model in eval mode on its device, its tokenizer, and a lock for the tokenizer.

    The lock: a ``tokenizers`` fast tokenizer is not safe to call from several threads at once
    (it mutates its truncation/padding state: "Already borrowed"), while the model is — so
    pooled threads share one model and take turns only for the (cheap) tokenizer calls.
    """

    def __init__(self, path: str | Path, role: str, device: str = "auto", vocab_file: str | Path | None = None):
        src = load_source(path, role, vocab_file)  # ours, an official .pth, or a transformers folder
        self.kind = src.kind
        self.device = resolve_device(device)
        self.model: BlipBase = src.model.to(self.device).eval()
        self.tokenizer = src.tokenizer
        self.lock = threading.Lock()
        self.image_size = self.model.cfg.vision.image_size

    def tokenize(self, texts: list[str], max_length: int):
        with self.lock:
            t = self.tokenizer(texts, max_length=max_length)
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def decode(self, ids: torch.Tensor) -> list[str]:
        with self.lock:
            return self.tokenizer.batch_decode(ids.cpu())


def model_fingerprint(path: str | Path, vocab_file: str | Path | None = None) -> str:
    """Content hash of a checkpoint (a folder: weights, config, tokenizer; an official file, with the
    vocabulary it needs): retrained or replaced model, new results."""
    path = Path(path)
    if path.is_file():
        return content_hash([path, *([vocab_file] if vocab_file else [])])
    return dir_fingerprint(path)
