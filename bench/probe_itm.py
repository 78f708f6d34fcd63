"""Probe: does the ITM head leave its prior in pre-training? (docs/recipe.md §0.6)

Pre-trains the default model (ITC + ITM + LM, the committed warm ViT) on the generated web +
human shards for ``--steps`` steps, the lr warmed up over 100 steps and then constant, and every
100 steps measures on 256 ``val`` pairs: the mean ITM p(match) of the positives, the share at
>= 0.5, and the ITM ROC-AUC of positives against random images and against the most ITC-similar
other image (hard). Variants: ``--lr`` (the text side and heads) and ``--vision-lr-scale`` (the
ViT's lr as a fraction of it, ``pretrain.vision_lr_scale``).

    dvc repro data tokenizer
    python bench/probe_itm.py --lr 3e-4 --vision-lr-scale 1      # BLIP's lr for everything
    python bench/probe_itm.py --lr 1e-3 --vision-lr-scale 0.3    # the default since issue 19
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from blip import params as P
from blip.data.loader import BlipLoader, LoaderConfig
from blip.model.blip import BlipPretrain
from blip.tokenizer import BlipTokenizer
from blip.train.optim import param_groups, set_lr
from blip.train.warmstart import load_vision_init


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    gt = (pos.view(-1, 1) > neg.view(1, -1)).float().mean()
    eq = (pos.view(-1, 1) == neg.view(1, -1)).float().mean()
    return float(gt + 0.5 * eq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default="data/generated")
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--vision-init", default="models/warmstart_vision")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-lr-scale", type=float, default=0.3)
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args()

    torch.manual_seed(0)
    prm = P.load(args.params)
    tok = BlipTokenizer.load(args.tokenizer)
    cfg = prm.model.config(tok.special_ids)
    model = BlipPretrain(cfg)
    load_vision_init(model, args.vision_init)
    opt = torch.optim.AdamW(param_groups(model, 0.05, args.vision_lr_scale), lr=args.lr)
    size = cfg.vision.image_size
    loader = BlipLoader([f"{args.root}/web", f"{args.root}/human"],
                        LoaderConfig(batch_size=32, image_size=size, train=True, min_scale=0.5, max_words=30, seed=0))
    val = next(iter(BlipLoader([f"{args.root}/val"], LoaderConfig(batch_size=256, image_size=size, train=False,
                                                                  max_words=30, seed=0))))

    @torch.no_grad()
    def measure() -> dict:
        model.eval()
        emb = model.encode_image(val["image"])
        t = tok(val["text"], max_length=30)
        ifeat, tfeat = model.image_features(emb), model.text_features(t.input_ids, t.attention_mask)
        n = len(val["text"])
        rows = torch.arange(n)
        same = val["image_id"].view(-1, 1) == val["image_id"].view(1, -1)
        hard = (tfeat @ ifeat.T).masked_fill(same, -9).argmax(1)
        rand = (rows + torch.randint(1, n, (n,), generator=torch.Generator().manual_seed(0))) % n

        def p(ix):
            return F.softmax(model.itm_logits(emb, t.input_ids, t.attention_mask, ix).float(), -1)[:, 1]

        pos = p(rows)
        model.train()
        return {"p_pos": round(float(pos.mean()), 4), "share_ge_0.5": round(float((pos >= 0.5).float().mean()), 4),
                "itm_auc_random": round(auc(pos, p(rand)), 4), "itm_auc_hard": round(auc(pos, p(hard)), 4)}

    step, t0, hist, ema = 0, time.time(), [], None
    while step < args.steps:
        for b in loader:
            set_lr(opt, 1e-6 + (args.lr - 1e-6) * min(1.0, step / 100))
            t = tok(b["text"], max_length=30)
            losses = model(b["image"], t.input_ids, t.attention_mask, alpha=0.4 * min(1.0, step / 578))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            step += 1
            ema = losses["itm"].item() if ema is None else 0.95 * ema + 0.05 * losses["itm"].item()
            if step % 100 == 0 or step == args.steps:
                row = {"step": step, "itm_loss_ema": round(ema, 4), "itc_loss": round(losses["itc"].item(), 3),
                       **measure(), "seconds": round(time.time() - t0)}
                print(json.dumps(row), flush=True)
                hist.append(row)
            if step >= args.steps:
                break
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curve": hist}, f, indent=2)


if __name__ == "__main__":
    main()
