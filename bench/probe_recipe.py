"""Recipe probe: pre-train with some params overrides, then measure on ``val`` what the recipe buys.

Used to choose the default recipe (``docs/recipe.md``): every probe trains the ``pretrain`` job on
the generated human + web pairs exactly as the pipeline does (``params.yaml`` + ``-S`` overrides),
then reports, on the ``val`` split only (never test/zeroshot):

* ITC retrieval (no ITM rerank): text R@1, image R@1 and their r_mean (R@1/5/10 both ways);
* ITM AUC: each val image's own caption vs another image's caption (random negatives) and vs
  its nearest ITC neighbour's caption (hard negatives);
* the pre-trained model's ITM as a filter of the first ``--web`` web pairs: ROC-AUC against the
  hidden noise labels, per noise kind (evaluation only, through ``blip.data.noise_labels``).

One JSON line per probe goes to ``--out`` (appended) with the overrides, the final losses, the
wall time, the CPU and whether bf16 ran.

    python bench/probe_recipe.py --data /path/data/generated --tokenizer /path/models/tokenizer \\
        -S pretrain.epochs=1 -S model.momentum=0.99 --name momentum-0.99
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blip import params as P  # noqa: E402
from blip.data.labels import noise_labels  # noqa: E402
from blip.data.loader import make_loader  # noqa: E402
from blip.evaluate.filter_quality import roc_auc  # noqa: E402
from blip.evaluate.retrieval import itm_eval  # noqa: E402
from blip.machine import cpu_name  # noqa: E402
from blip.model.scoring import (  # noqa: E402
    cosine_similarity,
    image_embeddings,
    itm_scores,
    text_embeddings,
)
from blip.tokenizer import BlipTokenizer  # noqa: E402
from blip.train.trainer import train  # noqa: E402


@torch.no_grad()
def val_metrics(model, tok, split_dir: str, web_dir: str, n_web: int) -> dict:
    model.eval()
    loader = make_loader(split_dir, batch_size=64, image_size=model.cfg.vision.image_size, train=False,
                         max_words=30, rank=0, world_size=1)
    embeds, feats, texts, txt2img, img2txt = [], [], [], [], []
    for b in loader:
        e, f = image_embeddings(model, b["image"])
        embeds.append(e)
        feats.append(f)
        for caps in b["captions"]:
            img2txt.append(np.arange(len(texts), len(texts) + len(caps)))
            txt2img += [len(img2txt) - 1] * len(caps)
            texts += caps
    E, F_img = torch.cat(embeds), torch.cat(feats)
    t = tok(texts, max_length=35)
    sims = cosine_similarity(F_img, text_embeddings(model, t.input_ids, t.attention_mask))
    out = {f"itc/{k}": round(v, 2) for k, v in itm_eval(sims.numpy(), sims.T.numpy(), np.asarray(txt2img), img2txt).items()}
    # ITM: own first caption vs a random other image's caption vs the hardest ITC neighbour's caption
    n = E.shape[0]
    first = torch.tensor([int(r[0]) for r in img2txt])
    rng = np.random.default_rng(0)
    rand_img = torch.tensor((np.arange(n) + rng.integers(1, n, n)) % n)
    img_sims = sims[:, first].clone()
    img_sims.fill_diagonal_(-2)
    hard_img = img_sims.argmax(1)
    rows = torch.cat([first, first[rand_img], first[hard_img]])
    idx = torch.arange(n).repeat(3)
    p = itm_scores(model, E, t.input_ids[rows], t.attention_mask[rows], image_index=idx).prob.numpy()
    pos, neg_r, neg_h = p[:n], p[n:2 * n], p[2 * n:]
    out["itm/auc_random"] = round(roc_auc(np.r_[pos, neg_r], np.r_[np.ones(n), np.zeros(n)]), 4)
    out["itm/auc_hard"] = round(roc_auc(np.r_[pos, neg_h], np.r_[np.ones(n), np.zeros(n)]), 4)
    out["itm/pos_mean"] = round(float(pos.mean()), 3)
    # the pre-trained ITM as a filter of web pairs, against the hidden labels
    labels = noise_labels(web_dir)
    keys, images, webtexts = [], [], []
    for b in make_loader(web_dir, batch_size=64, image_size=model.cfg.vision.image_size, train=False,
                         max_words=30, rank=0, world_size=1):
        for k, img, txt in zip(b["key"], b["image"], b["text"]):
            if len(keys) < n_web:
                keys.append(k)
                images.append(img)
                webtexts.append(txt)
        if len(keys) >= n_web:
            break
    e, f = image_embeddings(model, torch.stack(images))
    t = tok(webtexts, max_length=35)
    pw = itm_scores(model, e, t.input_ids, t.attention_mask).prob.numpy()
    cos = (f * text_embeddings(model, t.input_ids, t.attention_mask)).sum(1).numpy()
    kinds = np.array([labels[k] or "" for k in keys], dtype=object)
    noisy = kinds != ""
    out["web/itm_auc"] = round(roc_auc(1 - pw, noisy), 4)
    out["web/itc_auc"] = round(roc_auc(-cos, noisy), 4)
    for kind in sorted(set(kinds) - {""}):
        sel = (kinds == kind) | ~noisy
        out[f"web/itm_auc/{kind}"] = round(roc_auc(1 - pw[sel], kinds[sel] == kind), 3)
    model.train()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="generated data root (human/ val/ web/)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], help="params override key=value (repeatable)")
    ap.add_argument("--name", default="")
    ap.add_argument("--web", type=int, default=1000, help="web pairs scored as a filter")
    ap.add_argument("--init", default=None, help="start from this checkpoint instead of from scratch")
    ap.add_argument("--vision-init", default=None, help="ViT warm start directory (warmstart_vision)")
    ap.add_argument("--text-init", default=None, help="text warm start directory (warmstart_text)")
    ap.add_argument("--out", default="bench/probe_results.jsonl")
    ap.add_argument("--keep", default=None, help="keep the trained model in this folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    params = P.load(args.params, args.set)
    cfg = params.train("pretrain")
    tok = BlipTokenizer.load(args.tokenizer)
    data = Path(args.data)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep or Path(tmp) / "model")
        summary = train(cfg, [str(data / "web"), str(data / "human")], out_dir, init=args.init,
                        model_cfg=None if args.init else params.model.config(tok.special_ids),
                        tokenizer=None if args.init else tok, resume_dir=Path(tmp) / "resume",
                        vision_init=args.vision_init, text_init=args.text_init)
        from blip.checkpoint import load_model

        model = load_model(out_dir, arch="BlipPretrain")
        train_s = time.time() - t0
        metrics = val_metrics(model, tok, str(data / "val"), str(data / "web"), args.web)
    row = {"name": args.name, "overrides": args.set, "vision_init": args.vision_init, "text_init": args.text_init,
           "steps": summary["steps"], "final_ema": summary["final_ema"],
           "pairs_per_s": summary["pairs_per_s"], "train_s": round(train_s, 1), "bf16": summary["bf16"],
           "cpu": cpu_name(), **metrics}
    print(json.dumps(row))
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
