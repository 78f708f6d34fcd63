"""Training smoke test: 30 AdamW steps of the ``tiny`` preset on a few hundred generated pairs."""

from __future__ import annotations

import torch
from helpers_model import toy_pairs

from blip.model.blip import BlipPretrain
from blip.model.config import load_preset
from blip.tokenizer import build_tokenizer


def test_thirty_steps_lower_each_loss():
    torch.manual_seed(0)
    images, captions = toy_pairs(320)
    tok = build_tokenizer(captions, vocab_size=200)
    # queue of two batches so it holds real momentum features after two steps
    model = BlipPretrain(load_preset("tiny", text=tok.special_ids, queue_size=64)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    history = []
    B = 32
    for step in range(30):
        i = (step * B) % len(captions)
        text = tok(captions[i : i + B], max_length=30)
        out = model(images[i : i + B], text.input_ids, text.attention_mask, alpha=0.4 * min(1.0, step / 20))
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    for name in ("itc", "itm", "lm"):
        first = sum(h[name] for h in history[:5]) / 5
        last = sum(h[name] for h in history[-5:]) / 5
        assert last < first, f"{name}: {first:.3f} -> {last:.3f}"
    assert history[-1]["lm"] < 0.6 * history[0]["lm"]  # captions of this world are quickly learnable
