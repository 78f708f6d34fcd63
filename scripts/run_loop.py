"""The whole bootstrap loop, calling the engines directly (no orchestration).

    python scripts/run_loop.py [--out out/loop] [--params params.yaml] [--set section.key=value ...]

Stages: data → tokenizer → pretrain (noisy web + human) → finetune captioner, finetune filter
(human) → caption (web) → filter (web + synthetic) → assemble → repretrain (from scratch) →
downstream: fine-tune the baseline and the CapFilt model the same way (the baseline's
fine-tuned captioner and filter *are* its downstream models: same init, same recipe) →
evaluate both → one side-by-side table, with the wall time of every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip.cli import EvaluateParams, ModelParams, model_config, train_config  # noqa: E402
from blip.params import build, load_params, section  # noqa: E402

TIMES: dict[str, float] = {}


@contextmanager
def stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    t = time.perf_counter()
    yield
    TIMES[name] = time.perf_counter() - t
    print(f"--- {name}: {TIMES[name]:.1f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/loop")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    params = load_params(a.params, a.overrides)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from blip.capfilt import CaptionConfig, FilterConfig, AssembleConfig, assemble, caption_shards, score_shards
    from blip.checkpoint import load_model
    from blip.data import GenerateConfig, caption_corpus, generate, gt_path
    from blip.evaluate import evaluate_captioning, evaluate_filter, evaluate_retrieval, metrics_table
    from blip.tokenizer import build_tokenizer
    from blip.train import train

    torch.set_num_threads(os.cpu_count() or 1)
    data = out / "data"
    with stage("data"):
        gen = build(GenerateConfig, section(params, "data"), "data") if "data" in params else GenerateConfig()
        generate(gen, str(data), progress=False)
    web, human = data / "web", data / "human"
    with stage("tokenizer"):
        mp = build(ModelParams, section(params, "model"), "model")
        tok = build_tokenizer(caption_corpus([web, human]), mp.vocab_size)
    mcfg = model_config(params, tok)

    def fit(name: str, job_stage: str, shards, init=None, **kw):
        with stage(name):
            cfg = train_config(params, job_stage)
            s = train(cfg, shards, out / "models" / name, init=init, tokenizer=None if init else tok,
                      model_cfg=None if init else mcfg, metrics_path=out / "metrics" / f"{name}.json", **kw)
            print(json.dumps({k: s[k] for k in ("steps", "final_ema", "pairs_per_s", "seconds")}))
        return out / "models" / name

    pre = fit("pretrain", "pretrain", [web, human])
    captioner = fit("finetune_captioner", "finetune_captioner", human, init=pre)
    filt = fit("finetune_filter", "finetune_filter", human, init=pre)

    cap_dir, score_dir, boot = out / "capfilt" / "captions", out / "capfilt" / "scores", out / "capfilt" / "dataset"
    with stage("caption"):
        print(caption_shards(build(CaptionConfig, section(params, "caption"), "caption"), captioner, web, cap_dir))
    with stage("filter"):
        print(score_shards(build(FilterConfig, section(params, "filter"), "filter"), filt, web, cap_dir, score_dir))
    with stage("assemble"):
        stats = assemble(build(AssembleConfig, section(params, "assemble"), "assemble"), human, web, score_dir, boot)
        print(json.dumps(stats, indent=1))
    re_pre = fit("repretrain", "repretrain", boot)
    re_cap = fit("capfilt_captioner", "finetune_captioner", human, init=re_pre)
    re_ret = fit("capfilt_retrieval", "finetune_filter", human, init=re_pre)

    results = {}
    ev = build(EvaluateParams, section(params, "evaluate"), "evaluate")
    for label, ret_dir, cap_model_dir in [("baseline", filt, captioner), ("CapFilt", re_ret, re_cap)]:
        with stage(f"evaluate {label}"):
            ret = load_model(ret_dir)
            cap = load_model(cap_model_dir)
            m = {}
            for split in ev.retrieval_splits:
                r = evaluate_retrieval(ret, tok, data / split, k=ev.k_test, batch_size=ev.batch_size)
                m.update({f"{split}/{key}": v for key, v in r.items() if key.startswith(("txt_r", "img_r", "r_mean"))})
            split = ev.caption_split
            meteor = {"auto": "auto", "on": True, "off": False}[ev.meteor]
            cm, _ = evaluate_captioning(cap, tok, data / split, gt_path(str(data), split), meteor=meteor)
            m.update({f"{split}/{key}": v for key, v in cm.items() if key in ("Bleu_4", "CIDEr", "ROUGE_L", "METEOR")})
            results[label] = m
    with stage("filter quality"):
        fq = evaluate_filter(score_dir, web)
        print(json.dumps({k: fq[k] for k in ("precision", "recall", "auc", "drop_rate", "clean_drop_rate")}, indent=1))

    table = metrics_table(results)
    times = "\n".join(f"| {k} | {v:.1f} |" for k, v in TIMES.items())
    report = (f"## Baseline vs CapFilt\n\n{table}\n\n## Bootstrapped dataset\n\n```\n{json.dumps(stats, indent=1)}\n```\n\n"
              f"## Filter quality (hidden noise labels)\n\n```\n{json.dumps(fq, indent=1, default=str)}\n```\n\n"
              f"## Wall time per stage (s)\n\n| stage | s |\n|---|---|\n{times}\n| total | {sum(TIMES.values()):.1f} |\n")
    (out / "report.md").write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
