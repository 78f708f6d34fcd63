"""Ours vs transformers: caption generation and ITM scoring throughput, identical weights.

For each preset both implementations get the same random weights (through ``blip.convert``)
and the same inputs; each row times both in this one run, alternating, and prints the ratio
(ours / transformers; > 1 means we are faster). Beam-search rows also check that both produced
the same ids, so the two did the same work.

    python bench/bench_model.py                     # tiny and small, CPU
    python bench/bench_model.py --presets base --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from blip.convert import to_hf_captioner, to_hf_retrieval  # noqa: E402
from blip.model.blip import BlipCaptioner, BlipRetrieval  # noqa: E402
from blip.model.config import GenerationConfig, load_preset  # noqa: E402
from blip.model.scoring import itm_scores  # noqa: E402

BATCH = {"tiny": 32, "small": 16, "base": 16, "large": 8}


def timeit_pair(ours, theirs, repeats: int, sync) -> tuple[float, float]:
    """Median seconds of each, runs interleaved so load changes hit both alike."""
    times = {ours: [], theirs: []}
    for fn in (ours, theirs):  # warm-up
        fn()
    for _ in range(repeats):
        for fn in (ours, theirs):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[fn].append(time.perf_counter() - t)
    return statistics.median(times[ours]), statistics.median(times[theirs])


def random_texts(n: int, length: int, cfg, g: torch.Generator, device):
    ids = torch.randint(10, cfg.text.vocab_size, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # ragged, right padded
        k = length - int(torch.randint(0, length // 2, (1,), generator=g))
        ids[i, k - 1] = cfg.text.sep_token_id
        ids[i, k:] = cfg.text.pad_token_id
        mask[i, k:] = 0
    ids[:, 0] = cfg.text.cls_token_id
    return ids.to(device), mask.to(device)


def bench_preset(name: str, batch: int, repeats: int, device: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    cfg = load_preset(name)
    t = cfg.text
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cap = BlipCaptioner(cfg).eval()
    hf_cap = to_hf_captioner(cap)
    ret = BlipRetrieval(cfg).eval()
    hf_ret = to_hf_retrieval(ret)
    for m in (cap, hf_cap, ret, hf_ret):
        m.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(device, dtype)
    prompt = [t.cls_token_id, 10, 11, 12]  # [CLS] + a 3-word prompt, as "a picture of"
    hf_prompt = torch.tensor([prompt + [t.sep_token_id]] * batch, device=device)
    rows = []

    # -- caption generation ------------------------------------------------------------------
    settings = {
        "beam 3": (GenerationConfig(method="beam", num_beams=3, max_length=20, min_length=5),
                   dict(num_beams=3, max_length=20, min_length=5)),
        "nucleus": (GenerationConfig.nucleus(max_length=20, min_length=5),
                    dict(do_sample=True, top_p=0.9, top_k=50, repetition_penalty=1.1, max_length=20, min_length=5)),
    }
    with torch.no_grad():
        for label, (ours_cfg, hf_kw) in settings.items():
            out = {}

            def ours():
                out["ours"] = cap.generate(img, prompt, ours_cfg, seeds=list(range(batch)))

            def theirs():
                out["hf"] = hf_cap.generate(pixel_values=img, input_ids=hf_prompt.clone(), **hf_kw)

            t_ours, t_hf = timeit_pair(ours, theirs, repeats, sync)
            same = None
            if label.startswith("beam"):
                same = _trim(out["ours"], t.sep_token_id) == _trim(out["hf"], t.sep_token_id)
            rows.append(_row(name, f"caption {label}", "images/s", batch, t_ours, t_hf, same,
                             tokens=(out["ours"].shape[1], out["hf"].shape[1])))

        # -- ITM scoring ---------------------------------------------------------------------
        for per_image in (1, 2):
            n = batch * per_image
            ids, mask = random_texts(n, 30, cfg, g, device)
            enc_ids = ids.clone()
            enc_ids[:, 0] = t.enc_token_id
            index = torch.arange(batch, device=device).repeat_interleave(per_image)
            res = {}

            def ours():
                emb = ret.encode_image(img)
                res["ours"] = itm_scores(ret, emb, ids, mask, image_index=index, batch_size=n).prob

            def theirs():
                logits = hf_ret(input_ids=enc_ids, pixel_values=img[index], attention_mask=mask).itm_score
                res["hf"] = logits.float().softmax(-1)[:, 1]

            t_ours, t_hf = timeit_pair(ours, theirs, repeats, sync)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            same = bool(torch.allclose(res["ours"].float(), res["hf"].float(), atol=tol))
            label = "ITM 1 text/image" if per_image == 1 else "ITM 2 texts/image (filter workload)"
            rows.append(_row(name, label, "pairs/s", n, t_ours, t_hf, same))
    return rows


def _trim(seqs: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos, 4) + 1] if eos in row[4:] else row)
    return out


def _row(preset, task, unit, n, t_ours, t_hf, same, tokens=None) -> dict:
    return {
        "preset": preset, "task": task, "unit": unit, "ours": n / t_ours, "transformers": n / t_hf,
        "ratio": t_hf / t_ours, "same_output": same, "lengths": tokens,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch", type=int, default=None, help="images per call (default per preset)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = []
    for name in a.presets:
        rows += bench_preset(name, a.batch or BATCH[name], a.repeats, a.device, dtype)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{dev}, {a.dtype}, torch {torch.__version__}\n")
    print("| preset | task | unit | ours | transformers | ratio | same output |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['task']} | {r['unit']} | {r['ours']:.1f} | {r['transformers']:.1f} | "
              f"{r['ratio']:.2f} | {r['same_output'] if r['same_output'] is not None else 'n/a (sampling)'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
