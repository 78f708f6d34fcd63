"""`python -m blip plan`: FLOP formulas held to torch's FLOP counter, step counts to the trainer's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_model import micro_config, text_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blip import params as P
from blip.cli import main
from blip.model.blip import BlipCaptioner, BlipPretrain, BlipRetrieval
from blip.plan import caption_flops, job_flops, parse_samples, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job", ["pretrain", "retrieval", "captioner"])
def test_training_flops_match_torchs_flop_counter(job):
    """The analytic count of one training sample (forward + backward + momentum forward) is
    within 5% of what torch counts on the real model (attention on the math kernel, which torch
    counts; elementwise work and the ITC similarity matrices are not in the formula)."""
    cfg = micro_config()
    batch, length = 4, 12
    torch.manual_seed(0)
    image = torch.randn(batch, 3, 32, 32)
    ids, mask = text_inputs(batch, length)
    mask[:] = 1  # no padding: every text has `length` tokens, as the formula assumes
    model = {"pretrain": BlipPretrain, "retrieval": BlipRetrieval, "captioner": BlipCaptioner}[job](cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        if job == "pretrain":
            losses = model(image, ids, mask, alpha=0.4)
        elif job == "retrieval":
            losses = model(image, ids, mask, idx=torch.arange(batch), alpha=0.4)
        else:
            losses = model(image, ids, mask, prompt_length=2)
        sum(losses.values()).backward()
    counted = counter.get_total_flops() / batch
    assert job_flops(job, cfg, length).train == pytest.approx(counted, rel=0.05)


def test_nucleus_captions_cost_one_sequence_and_beams_three():
    cfg = micro_config()
    one, three = caption_flops(cfg, 20, 1), caption_flops(cfg, 20, 3)
    assert 2.5 < (three - caption_flops(cfg, 20, 0)) / (one - caption_flops(cfg, 20, 0)) < 3.5


def test_the_embedded_plan_counts_the_steps_the_trainer_runs():
    """Steps per epoch = ceil(pairs / batch) (the loader keeps the last batch): 580 pre-training
    steps on 8000 web + 250x5 human pairs at 32, 200 fine-tuning steps (5 epochs of 1250 human
    pairs) — what the default run logs (metrics/train/*.json)."""
    params = P.load(ROOT / "params.yaml")
    rows, n = plan(params)
    steps = {r.stage: r.steps for r in rows}
    g = params.generate
    pairs = g.web + g.human * g.captions_per_image
    assert n["web"].pairs == g.web and n["human"].pairs == g.human * g.captions_per_image
    assert steps["pretrain"] == params.pretrain.epochs * math.ceil(pairs / params.pretrain.batch_size) == 580
    assert steps["finetune_filter"] == steps["downstream_retrieval"] == 5 * math.ceil(1250 / 32) == 200
    assert "warmstart_text" not in steps  # switched off in params.yaml: nothing to price
    assert all(r.flops > 0 for r in rows)


def test_the_paper_variant_plans_the_papers_steps(capsys, tmp_path):
    """ViT-B, 14M images, global batch 2880, 20 epochs: 20 x ceil(14.57M / 2880) pre-training
    steps; COCO fine-tuning at 256: 5 epochs (captioner) and 6 (retrieval)."""
    web, coco = 14_000_000, 113_287
    rc = main(["plan", "--params", str(ROOT / "params.yaml"), "--variant", "paper", "--samples", f"web={web}",
               f"human={coco}", "test=5000", "zeroshot=1000", "--json", str(tmp_path / "plan.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model base" in out and "| **total** |" in out
    rows = {r["stage"]: r for r in json.loads((tmp_path / "plan.json").read_text())}
    pairs = web + 5 * coco
    assert rows["pretrain"]["steps"] == 20 * math.ceil(pairs / 2880) == 101_160
    assert rows["finetune_captioner"]["steps"] == 5 * math.ceil(5 * coco / 256)
    assert rows["finetune_filter"]["steps"] == 6 * math.ceil(5 * coco / 256)
    assert rows["repretrain"]["samples"] == 2 * web + 5 * coco  # the upper bound: every text kept
    assert "warmstart_vision" not in rows  # BLIP starts from ImageNet weights, not our stand-in
    per_pair = rows["pretrain"]["flops"] / (rows["pretrain"]["steps"] * 2880)
    assert 150e9 < per_pair < 400e9  # ViT-B/16 at 224 + BERT-base x 5 passes, x3 for backward
    # fine-tuning at 384 px (577 image tokens against 197): the same captioner job costs more per pair
    assert rows["pretrain"]["note"].endswith("224 px") and rows["finetune_captioner"]["note"].endswith("384 px")
    assert rows["downstream_retrieval"]["flops"] == rows["finetune_filter"]["flops"]


def test_plan_counts_real_shards_and_names_a_split_it_cannot_count(tmp_path, capsys):
    from blip.data.generator import GenerateConfig, generate

    generate(GenerateConfig(web=10, human=4, val=2, test=2, zeroshot=2, shard_size=5), str(tmp_path / "d"),
             progress=False)
    params = P.load(ROOT / "params.yaml", {"data.root": str(tmp_path / "d"), "data.web": str(tmp_path / "d/web")})
    rows, n = plan(params)
    assert (n["web"].images, n["human"].pairs) == (10, 20) and "shards in" in n["web"].source
    params = P.load(ROOT / "params.yaml", {"data.root": str(tmp_path / "mine"), "data.web": str(tmp_path / "w")})
    with pytest.raises(ValueError, match=r"split 'web'.*--samples web=N"):
        plan(params)
    with pytest.raises(ValueError, match="SPLIT=N"):
        parse_samples(["laion=5"])
