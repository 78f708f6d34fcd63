"""Pre-training throughput: pairs/s and achieved GFLOP/s against the matmul peak measured in the same run.

One optimizer step of ``BlipPretrain`` (ITC + ITM + LM, momentum update, queues) on a batch of
generated images and captions, as the trainer runs it (AdamW, optional bfloat16 autocast),
timed after warm-up; its FLOPs are counted once with ``torch.utils.flop_counter`` (matmuls,
convolutions and attention, forward + backward). The peak is a large square matmul in the same
dtype, same threads, same process. Prints one table row per dtype and a JSON line.

    python bench/bench_train.py [--preset tiny] [--batch-size 32] [--steps 10] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from blip.dist import bf16_enabled, train_autocast  # noqa: E402
from blip.machine import cpu_name  # noqa: E402
from blip.model.blip import BlipPretrain  # noqa: E402
from blip.model.config import load_preset  # noqa: E402
from blip.tokenizer import build_tokenizer  # noqa: E402
from blip.train.optim import param_groups  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype`` (median of ``repeat``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    from helpers_model import toy_pairs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    a = ap.parse_args(argv)

    images, captions = toy_pairs(max(a.batch_size * 4, 256), seed=0)
    tok = build_tokenizer(captions, vocab_size=1024)
    cfg = load_preset(a.preset, text=tok.special_ids, queue_size=a.queue_size)
    size = cfg.vision.image_size
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    bf16_native = bf16_enabled("auto", torch.device("cpu"))
    print(f"CPU: {cpu_name()}; threads {torch.get_num_threads()}; native bf16 (AVX512-BF16/AMX): {bf16_native}")
    rows = []
    for name in a.dtypes:
        torch.manual_seed(0)
        model = BlipPretrain(cfg).train()
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)

        def step(i: int) -> None:
            lo = (i * a.batch_size) % (len(captions) - a.batch_size)
            text = tok(captions[lo:lo + a.batch_size], max_length=30)
            with train_autocast(torch.device("cpu"), name == "bf16"):
                losses = model(images[lo:lo + a.batch_size], text.input_ids, text.attention_mask, alpha=0.4)
            sum(losses.values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(0)
        step(1)  # warm-up (allocator, oneDNN primitives)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step(2)
        flops = counter.get_total_flops()
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            step(3 + i)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        peak = matmul_peak(torch.bfloat16 if name == "bf16" else torch.float32)
        achieved = flops / t / 1e9
        rows.append({"dtype": name, "pairs_per_s": round(a.batch_size / t, 1), "step_s": round(t, 4),
                     "gflop_per_step": round(flops / 1e9, 2), "gflops": round(achieved, 1),
                     "matmul_peak_gflops": round(peak, 1), "of_peak": round(achieved / peak, 3)})
    print(f"{'dtype':6s} {'pairs/s':>8s} {'step s':>7s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'peak':>8s} {'of peak':>7s}")
    for r in rows:
        print(f"{r['dtype']:6s} {r['pairs_per_s']:8.1f} {r['step_s']:7.3f} {r['gflop_per_step']:10.2f} "
              f"{r['gflops']:8.1f} {r['matmul_peak_gflops']:8.1f} {100 * r['of_peak']:6.1f}%")
    print(json.dumps({"cpu": cpu_name(), "bf16_native": bf16_native, "preset": a.preset, "batch_size": a.batch_size,
                      "rows": rows}))


if __name__ == "__main__":
    main()
