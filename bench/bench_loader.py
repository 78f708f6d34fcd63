"""Benchmark: default data generation wall time and loader throughput (decode + BLIP train
transforms), at 0 and 2 DataLoader workers, on the default generated world.

    python bench/bench_loader.py                      # generate into a temp dir, then measure
    python bench/bench_loader.py --root data/generated --skip-generate
    python bench/bench_loader.py --json bench_loader.json

Issue 3's bar: generation of the default splits < 2 min on 2 cores, and the loader at least 3x
the ``tiny`` model's training throughput at its default batch size (``train_throughput`` below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip.data.generator import GenerateConfig, generate  # noqa: E402


def train_throughput(data_root: str, batch_size: int, steps: int = 20, warmup: int = 3) -> float:
    """Pre-training pairs/s of the ``tiny`` model (ITC + ITM + LM, forward + backward + AdamW).

    Batches are read from the web split beforehand, so only the model's time is measured.
    """
    import torch

    from blip.data.corpus import caption_corpus
    from blip.data.loader import make_loader
    from blip.model.blip import BlipPretrain
    from blip.model.config import load_preset
    from blip.tokenizer import build_tokenizer

    torch.manual_seed(0)
    web = os.path.join(data_root, "web")
    tok = build_tokenizer(caption_corpus(web), vocab_size=1024)
    model = BlipPretrain(load_preset("tiny", text=tok.special_ids)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = []
    for b in make_loader(web, batch_size=batch_size):
        batches.append((b["image"], tok(b["text"], max_length=30)))
        if len(batches) == steps + warmup:
            break
    t0 = 0.0
    for i, (img, text) in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        losses = model(img, text.input_ids, text.attention_mask)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def time_generation(out_dir: str, processes: int) -> float:
    t0 = time.perf_counter()
    generate(GenerateConfig(), out_dir, processes=processes, progress=False)
    return time.perf_counter() - t0


def time_loader(shards: str, batch_size: int, num_workers: int, epochs: int, **cfg) -> dict:
    """Pairs/s over ``epochs`` full training epochs; ``steady`` excludes each epoch's first batch
    (worker start-up and shuffle-buffer fill)."""
    from blip.data.loader import make_loader

    loader = make_loader(shards, batch_size=batch_size, num_workers=num_workers, **cfg)
    total_pairs, total_s, steady_pairs, steady_s = 0, 0.0, 0, 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for batch in loader:
            n += len(batch["text"])
            if t_first is None:
                t_first, n_first = time.perf_counter(), n
        t1 = time.perf_counter()
        total_pairs += n
        total_s += t1 - t0
        steady_pairs += n - n_first
        steady_s += t1 - t_first
    loader.stats.check()
    return {"workers": num_workers, "pairs": total_pairs, "pairs_per_s": total_pairs / total_s,
            "steady_pairs_per_s": steady_pairs / steady_s if steady_s else float("nan"),
            "skipped": dict(loader.stats.skipped)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="generated data root (default: a temp dir)")
    p.add_argument("--skip-generate", action="store_true", help="use existing data under --root")
    p.add_argument("--processes", type=int, default=os.cpu_count(), help="generation processes")
    p.add_argument("--batch-size", type=int, default=32, help="the tiny model's default batch size")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    tmp = None
    root = a.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        root = os.path.join(tmp.name, "generated")
    results: dict = {"cpus": os.cpu_count(), "batch_size": a.batch_size}
    if not a.skip_generate:
        results["generate_s"] = time_generation(root, a.processes)
        print(f"generate default splits (web 5000, human 1000x5, val/test/zeroshot 250x5), "
              f"{a.processes} processes: {results['generate_s']:.1f} s (bar: < 120 s)")
    results["loader"] = []
    for split, min_scale in (("web", 0.2), ("human", 0.5)):
        for workers in (0, 2):
            r = time_loader(os.path.join(root, split), a.batch_size, workers, a.epochs, min_scale=min_scale)
            r["split"] = split
            results["loader"].append(r)
            print(f"loader {split:5s} train transforms, {workers} workers: {r['pairs_per_s']:7.0f} pairs/s "
                  f"(steady {r['steady_pairs_per_s']:7.0f}) over {r['pairs']} pairs")
    train = train_throughput(root, a.batch_size)
    results["train_pairs_per_s"] = train
    if train:  # the loader feeds one training process: compare with its best setting
        best = max(r["pairs_per_s"] for r in results["loader"] if r["split"] == "web")
        results["loader_over_train"] = best / train
        print(f"tiny model training: {train:.0f} pairs/s; loader/train = {best / train:.1f}x (bar: >= 3x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
