"""The frozen ViT's token cache (``blip/model/embed_cache.py``): keyed by pixels, exact, bounded."""

from __future__ import annotations

import pytest
import torch
from helpers_model import micro_config

from blip.model.blip import BlipPretrain
from blip.model.embed_cache import ImageEmbedCache


class CountingEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 5)
        self.rows = 0

    def forward(self, image):
        self.rows += len(image)
        return self.proj(image.flatten(1)).unsqueeze(1)


def test_each_image_is_encoded_once_and_a_hit_is_what_the_encoder_returns():
    enc, cache = CountingEncoder(), ImageEmbedCache(max_bytes=2**20)
    images = torch.randn(6, 3, 2, 2)
    batch = images[[0, 1, 2, 0]]  # a batch may hold one image twice (five captions of one image)
    first = cache(batch, enc)
    assert enc.rows == 3 and cache.stats() == {"images": 3, "hits": 1, "misses": 3, "mib": 0.0, "full": False}
    torch.testing.assert_close(first, enc(batch), rtol=0, atol=0)
    enc.rows = 0
    again = cache(images[[2, 3, 1]], enc)
    assert enc.rows == 1  # only image 3 is new
    assert torch.equal(again[0], first[2]) and torch.equal(again[2], first[1])  # a hit is the stored tensor
    torch.testing.assert_close(again, enc(images[[2, 3, 1]]))  # a miss alone vs in a batch: float rounding
    moved = images[[1]].clone()
    moved[0, 0, 0, 0] += 1e-3  # a transform that changed one pixel is another image
    enc.rows = 0
    cache(moved, enc)
    assert enc.rows == 1


def test_the_cache_stops_growing_at_its_limit_and_keeps_serving():
    enc = CountingEncoder()
    cache = ImageEmbedCache(max_bytes=2 * 5 * 4)  # two rows of (1, 5) float32
    images = torch.randn(4, 3, 2, 2)
    out = cache(images, enc)
    torch.testing.assert_close(out, enc(images), rtol=0, atol=0)
    assert len(cache) == 2 and cache.stats()["full"]
    enc.rows = 0
    cache(images, enc)
    assert enc.rows == 2 and cache.hits == 2
    with pytest.raises(ValueError, match="max_bytes"):
        ImageEmbedCache(0)


def test_only_a_frozen_deterministic_vit_is_cached():
    model = BlipPretrain(micro_config())
    with pytest.raises(ValueError, match="freeze_vision"):
        model.cache_image_embeds(2**20)
    model.freeze_vision()
    cache = model.cache_image_embeds(2**20)
    image = torch.randn(3, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    torch.testing.assert_close(model.encode_image(image), model.visual_encoder(image), rtol=0, atol=0)
    model.encode_image(image)
    assert cache.hits == 3 and cache.misses == 3
    cfg = micro_config()
    cfg.vision.drop_path_rate = 0.1
    noisy = BlipPretrain(cfg)
    noisy.freeze_vision()
    with pytest.raises(ValueError, match="drop_path_rate"):
        noisy.cache_image_embeds(2**20)
