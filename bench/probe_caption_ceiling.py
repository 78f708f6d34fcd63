"""Is the captioner at its locked ViT's ceiling? Per ``val`` image: does a linear probe of the ViT's
class token name the right object kinds, and does the captioner?

The ViT is locked in every stage (``vision_lr_scale: 0``), so what the captioner can name is what
the warm start's ViT separates. The probe refits the warm start's own objective (a linear head on
the class token, multi-hot labels; the warm start does not keep its head) on labelled images no
stage has seen (``probe_vit_shape.labelled``), then reads each ``val`` image: its set of object kinds
(colour and shape of every group) exactly right or not. The captioner captions the same images
(``probe_captioner.caption_split``, the caption stage's worker) and the checker says whether the
caption names the right objects (and, per scene size, its first error: ``first_errors``). The cross-table, split by the number of object groups in the
scene, says where the captions fail because the image tower does not see, and where the text side
loses what it does see. ``val`` only; one JSON line per run to ``--out`` (docs/recipe.md §0.12).

    python bench/probe_caption_ceiling.py --captioner models/captioner --data data/generated
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from probe_captioner import caption_split  # noqa: E402
from probe_vit_shape import features, labelled  # noqa: E402

from blip import params as P  # noqa: E402
from blip.checkpoint import load_model  # noqa: E402
from blip.data.loader import make_loader  # noqa: E402
from blip.evaluate.caption_check import (  # noqa: E402
    check_caption,
    generator_config,
    objects_right,
    parse_caption,
    scene_of_web,
)
from blip.machine import cpu_name  # noqa: E402
from blip.train.warmstart import label_groups, scene_labels  # noqa: E402


def fit_head(x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(head(x), y).backward()
        opt.step()
    return head


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captioner", required=True, help="a captioner checkpoint (its ViT is the one probed)")
    ap.add_argument("--data", required=True, help="generated data root (val/ web/ manifest.json)")
    ap.add_argument("--images", type=int, default=30000, help="labelled images: the last 3000 are held out")
    ap.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps of the linear head")
    ap.add_argument("--decoding", default="beam")
    ap.add_argument("-S", "--set", action="append", default=[], help="params override key=value (repeatable)")
    ap.add_argument("--out", default="bench/probe_caption_ceiling.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    data = Path(args.data)
    prm = P.load("params.yaml", args.set)
    vit = load_model(args.captioner).visual_encoder
    images, labels, names = labelled(args.images, prm.generate.seed, prm.generate.world)
    feats = features(vit, images)[0]  # the class token
    n_train = args.images - 3000
    head = fit_head(feats[:n_train], labels[:n_train], args.steps)
    groups = label_groups(names)
    obj = groups["object"]
    with torch.no_grad():
        pred = head(feats[n_train:]) > 0
    held_out = {g: round(float((pred[:, i] == (labels[n_train:, i] > 0)).all(1).float().mean()), 4)
                for g, i in groups.items()}

    cfg = generator_config(str(data / "web"))
    vit_right: dict[str, bool] = {}
    loader = make_loader(str(data / "val"), batch_size=128, image_size=vit.cfg.image_size, train=False,
                         expand_captions=False)
    with torch.no_grad():
        for batch in loader:
            logits = head(vit(batch["image"])[:, 0].float())
            for key, row in zip(batch["key"], logits):
                y = torch.from_numpy(scene_labels(scene_of_web(key, cfg, split="val"), names)) > 0
                vit_right[key] = bool(((row[obj] > 0) == y[obj]).all())
    with tempfile.TemporaryDirectory() as tmp:
        caps = caption_split(Path(args.captioner), data, "val", args.decoding, args.set, Path(tmp))
    table: Counter = Counter()
    first_errors: Counter = Counter()
    for key, text in caps.items():
        scene = scene_of_web(key, cfg, split="val")
        cap = "caption_right" if objects_right(text, scene) else "caption_wrong"
        table[f"{len(scene.groups)}_groups/{'vit_right' if vit_right[key] else 'vit_wrong'}/{cap}"] += 1
        label = check_caption(text, scene)[0]
        first_errors[f"{len(scene.groups)}_groups/{label}"] += 1
        said = parse_caption(text)
        if label == "wrong_shape" and len(scene.groups) == 2 and said is not None and len(said.groups) == 2:
            same = said.groups[0].shape == said.groups[1].shape  # one shape named for both groups
            first_errors["2_groups/wrong_shape/" + ("one_shape_twice" if same else "other")] += 1
    n = len(caps)
    row = {"captioner": args.captioner, "decoding": args.decoding, "overrides": args.set, "cpu": cpu_name(),
           "held_out_exact": held_out, "n": n,
           "vit_objects_right": round(sum(vit_right[k] for k in caps) / n, 4),
           "caption_objects_right": round(sum(v for k, v in table.items() if k.endswith("/caption_right")) / n, 4),
           "table": dict(sorted(table.items())), "first_errors": dict(sorted(first_errors.items()))}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
