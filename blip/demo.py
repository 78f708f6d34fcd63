"""A few-minute end-to-end demo: generate a small world, pre-train the ``tiny`` model, caption.

The project's main job until the orchestrated pipeline lands: it exercises the data layer, the
tokenizer, the trainer (ITC + ITM + LM pre-training) and both decoding methods on a CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import load_model
from .model.config import GenerationConfig, load_preset
from .tokenizer import build_tokenizer
from .train.config import TrainConfig
from .train.trainer import train


def run_demo(out: str = "out/demo", steps: int = 300, batch_size: int = 32, seed: int = 0, show: int = 6) -> dict:
    from .data.corpus import caption_corpus
    from .data.generator import GenerateConfig, generate
    from .data.loader import make_loader

    out_dir = Path(out)
    data = out_dir / "data"
    t0 = time.time()
    generate(GenerateConfig(seed=seed, web=1500, human=300, val=show, test=0, zeroshot=0), str(data), progress=False)
    train_dirs = [data / "web", data / "human"]
    tok = build_tokenizer(caption_corpus(train_dirs), vocab_size=1024)
    print(f"data + tokenizer ({len(tok)} tokens): {time.time() - t0:.1f}s")

    cfg = TrainConfig(job="pretrain", epochs=1000, max_steps=steps, batch_size=batch_size, lr=1e-3,
                      warmup_steps=30, min_scale=0.5, seed=seed, log_every=25)
    summary = train(cfg, train_dirs, out_dir / "model", model_cfg=load_preset("tiny", text=tok.special_ids,
                                                                             queue_size=256), tokenizer=tok)
    print(f"trained {summary['steps']} steps, {summary['pairs_per_s']} pairs/s, final {summary['final_ema']}")

    model = load_model(out_dir / "model").eval()
    batch = next(iter(make_loader(str(data / "val"), batch_size=show, image_size=model.cfg.vision.image_size,
                                  train=False)))
    beam = model.caption(batch["image"], tok, GenerationConfig(method="beam"))
    nucleus = model.caption(batch["image"], tok, GenerationConfig.nucleus(), seeds=list(range(show)))
    for i in range(len(batch["text"])):
        print(f"\nimage {batch['key'][i]}\n  truth:   {batch['text'][i]}\n  beam:    {beam[i]}\n  nucleus: {nucleus[i]}")
    print(f"\nsaved {out_dir / 'model'} ({time.time() - t0:.0f}s in all)")
    return summary["final_ema"]
