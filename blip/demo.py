"""A few-minute end-to-end demo: generate a small world, pre-train the ``tiny`` model, caption.

Until the full bootstrap pipeline lands this is the project's main job: it exercises the data
layer, the tokenizer, BLIP pre-training (ITC + ITM + LM) and both decoding methods on a CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .checkpoint import save_model
from .model import BlipPretrain, GenerationConfig, load_preset
from .tokenizer import build_tokenizer


def run_demo(out: str = "out/demo", steps: int = 300, batch_size: int = 32, seed: int = 0, show: int = 6) -> dict:
    from .data import GenerateConfig, caption_corpus, generate, make_loader

    torch.manual_seed(seed)
    out_dir = Path(out)
    data = out_dir / "data"
    t0 = time.time()
    generate(GenerateConfig(seed=seed, web=1500, human=300, val=show, test=0, zeroshot=0), str(data), progress=False)
    train_dirs = [str(data / "web"), str(data / "human")]
    tok = build_tokenizer(caption_corpus(train_dirs), vocab_size=1024)
    cfg = load_preset("tiny", text=tok.special_ids, queue_size=1024)
    print(f"data + tokenizer ({len(tok)} tokens): {time.time() - t0:.1f}s")

    model = BlipPretrain(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    loader = make_loader(train_dirs, batch_size=batch_size, image_size=cfg.vision.image_size, seed=seed)
    step, t1, avg = 0, time.time(), {}
    while step < steps:
        for batch in loader:
            text = tok(batch["text"], max_length=30)
            losses = model(batch["image"], text.input_ids, text.attention_mask, alpha=0.4 * min(1.0, step / (steps / 2)))
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
            sched.step()
            for k, v in losses.items():
                avg[k] = 0.9 * avg.get(k, float(v)) + 0.1 * float(v.detach())
            step += 1
            if step % 25 == 0 or step == steps:
                rate = step * batch_size / (time.time() - t1)
                print(f"step {step:4d}/{steps}  " + "  ".join(f"{k} {v:.3f}" for k, v in avg.items()) + f"  ({rate:.0f} pairs/s)")
            if step >= steps:
                break
    print(f"loader: {loader.stats}")

    model.eval()
    val = make_loader(str(data / "val"), batch_size=show, image_size=cfg.vision.image_size, train=False)
    batch = next(iter(val))
    prompt = tok.prompt_ids(cfg.prompt)
    beam = model.generate(batch["image"], prompt, GenerationConfig(method="beam"))
    nucleus = model.generate(batch["image"], prompt, GenerationConfig.nucleus(), seeds=list(range(show)))
    strip = len(cfg.prompt.strip())
    for i in range(len(batch["text"])):
        print(f"\nimage {batch['key'][i]}\n  truth:   {batch['text'][i]}"
              f"\n  beam:    {tok.decode(beam[i])[strip:].strip()}\n  nucleus: {tok.decode(nucleus[i])[strip:].strip()}")
    path = save_model(model, out_dir / "model", tokenizer=tok)
    print(f"\nsaved {path} ({time.time() - t0:.0f}s in all)")
    return {k: float(v) for k, v in avg.items()}
