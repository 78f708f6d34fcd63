"""A locked ViT's image tokens, memoised by image content (LiT's precomputed image tower).

When the ViT is frozen (``vision_lr_scale: 0``), its stochastic depth is off and the training
transform is deterministic (no crop, no flip, no RandomAugment), every epoch feeds it the same
pixels and it returns the same tokens. The trainer then computes each image's tokens once per
stage and reuses them: the later epochs of pre-training, and the 15 epochs of the captioner's
fine-tune on 250 images, skip the ViT's forward pass.

The key is a 128-bit BLAKE2b digest of the image tensor's bytes (plus its dtype and shape), not
the sample's name: two shards that hold the same file share an entry, and a transform that did
change the pixels simply misses. Values are exactly what the encoder returned (same dtype, same
device), so a hit is the tensor a miss would have produced, up to the batch it was computed in.
Entries stop being added at ``max_bytes``; hits keep being served.
"""

from __future__ import annotations

import hashlib

import torch


class ImageEmbedCache:
    """``cache(image, encoder)`` → ``encoder(image)``, each row computed at most once."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes}: the cache's size limit, > 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.full = False
        self._store: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def keys(image: torch.Tensor) -> list[bytes]:
        rows = image.detach().to("cpu").contiguous()
        head = f"{rows.dtype}{tuple(rows.shape[1:])}".encode()
        return [hashlib.blake2b(head + r.view(torch.uint8).numpy().tobytes(), digest_size=16).digest() for r in rows]

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, encoder) -> torch.Tensor:
        keys = self.keys(image)
        fresh: dict[bytes, torch.Tensor] = {}
        todo: list[int] = []  # the first row of every image not cached (a batch may repeat an image)
        seen: set[bytes] = set()
        for i, k in enumerate(keys):
            if k not in self._store and k not in seen:
                seen.add(k)
                todo.append(i)
        if todo:
            out = encoder(image if len(todo) == len(keys) else image[todo])
            for j, i in enumerate(todo):
                fresh[keys[i]] = out[j]
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        embeds = torch.stack([self._store[k] if k in self._store else fresh[k] for k in keys])
        for k, e in fresh.items():
            size = e.numel() * e.element_size()
            if self.bytes + size > self.max_bytes:
                self.full = True
                break
            self._store[k] = e.clone()
            self.bytes += size
        return embeds

    def stats(self) -> dict[str, int | bool]:
        """``images`` cached, ``hits``/``misses`` (rows served from it / computed), ``mib``, ``full``."""
        return {"images": len(self._store), "hits": self.hits, "misses": self.misses,
                "mib": round(self.bytes / 2**20, 1), "full": self.full}
