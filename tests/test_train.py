"""Training engines: schedules, parameter groups, loss trends, kill-and-resume, DDP (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_model import micro_config
from safetensors.torch import load_file

from blip.checkpoint import load_model
from blip.data.corpus import caption_corpus
from blip.data.generator import GenerateConfig, generate
from blip.dist import train_autocast
from blip.model.blip import BlipPretrain
from blip.model.config import load_preset
from blip.tokenizer import build_tokenizer
from blip.track import MemoryTracker
from blip.train.config import TrainConfig
from blip.train.optim import lr_at, param_groups
from blip.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def test_step_schedule_warms_up_then_decays_per_epoch():
    cfg = TrainConfig(lr=1e-3, warmup_lr=1e-6, warmup_steps=10, min_lr=1e-5, lr_decay_rate=0.9)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-6)
    assert lr_at(cfg, 0, 5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(cfg, 0, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 2, 0) == pytest.approx(1e-3 * 0.81)
    assert lr_at(cfg, 100, 0) == pytest.approx(1e-5)  # floored at min_lr


def test_cosine_schedule_per_epoch():
    cfg = TrainConfig(schedule="cosine", lr=1e-4, min_lr=0.0, epochs=4)
    assert [round(lr_at(cfg, e, 7) / 1e-4, 4) for e in range(4)] == [1.0, 0.8536, 0.5, 0.1464]


def test_no_weight_decay_on_biases_norms_and_temp_and_tied_parameters_once():
    model = BlipPretrain(micro_config())
    groups = param_groups(model, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert id(model.temp) in no_decay and id(model.text_encoder.embeddings.LayerNorm.weight) in no_decay
    assert id(model.visual_encoder.pos_embed) in no_decay
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # shared tensors are optimised once
    assert not any(names[i].endswith("_m") or "_m." in names[i] for i in decay | no_decay)  # momentum frozen


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "gen"
    generate(GenerateConfig(seed=3, web=320, human=64, val=0, test=0, zeroshot=0, shard_size=40), str(root),
             progress=False)
    tok = build_tokenizer(caption_corpus([root / "web", root / "human"]), vocab_size=400)
    return root, tok


def _tiny(tok):  # the tiny preset, two layers per tower, to keep the suite fast
    return load_preset("tiny", text={**tok.special_ids, "num_hidden_layers": 2}, vision={"depth": 2}, queue_size=64)


def test_train_autocast_runs_bf16_attention_on_the_math_kernel_on_cpu():
    """CPU flash attention's bf16 backward is several times slower than the math kernel, so a bf16
    training step on CPU runs with flash off; gradients agree with float32, and both flags come back."""
    cpu = torch.device("cpu")
    assert torch.backends.cuda.flash_sdp_enabled()
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 9, 16, requires_grad=True) for _ in range(3))
    grads = {}
    for bf16 in (False, True):
        with train_autocast(cpu, bf16):
            assert torch.is_autocast_enabled("cpu") is bf16
            assert torch.backends.cuda.flash_sdp_enabled() is not bf16
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
        grads[bf16] = torch.autograd.grad(y.float().square().sum(), q)[0]
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(grads[True], grads[False], atol=0.05, rtol=0.05)


def test_pretrain_then_finetune_lower_the_losses(world, tmp_path):
    root, tok = world
    tr = MemoryTracker()
    cfg = TrainConfig(job="pretrain", epochs=2, batch_size=32, lr=1e-3, warmup_steps=5, log_every=1, progress=False)
    s = train(cfg, [root / "web", root / "human"], tmp_path / "pre", model_cfg=_tiny(tok), tokenizer=tok, tracker=tr)
    # 320 web pairs + 64 human images x 5 captions = 640 pairs = 20 steps of 32 per epoch
    assert s["steps"] == 2 * 20 and s["loader"]["seen"] == s["loader"]["used"]
    for k in ("train/itc", "train/itm", "train/lm"):
        h = tr.history(k)
        assert sum(h[-6:]) / 6 < sum(h[:6]) / 6, (k, h)
    assert not (tmp_path / "pre.resume").exists()  # resume state removed once the model is written
    report = json.loads((tmp_path / "pre" / "data_report.json").read_text())  # what was read, by name
    assert report["seen"] == report["used"] + sum(report["skipped"].values()) and "named" in report
    pre = load_model(tmp_path / "pre")
    assert pre.load_report == {"missing": [], "unexpected": []}

    for job, keys in [("finetune_captioner", ["train/lm"]), ("finetune_filter", ["train/itm", "train/itc"])]:
        tr = MemoryTracker()
        cfg = TrainConfig(job=job, epochs=4, batch_size=32, lr=5e-4, schedule="cosine", min_lr=0.0, log_every=1,
                          max_text_len=40, min_scale=0.5, alpha_ramp_epochs=1, progress=False)
        train(cfg, root / "human", tmp_path / job, init=tmp_path / "pre", tracker=tr)
        for k in keys:
            h = tr.history(k)
            assert sum(h[-3:]) / 3 < sum(h[:3]) / 3, (job, k, h)
        assert (tmp_path / job / "tokenizer" / "tokenizer.json").exists()


def test_finetune_at_another_image_size_interpolates_the_position_embeddings(world, tmp_path):
    """BLIP pre-trains at 224 px and fine-tunes at 384: ``image_size`` builds the fine-tuned model at
    the new size from the pre-trained weights (pos_embed interpolated), and it is saved at that size."""
    root, tok = world
    cfg = TrainConfig(job="pretrain", epochs=1, batch_size=32, max_steps=1, progress=False)
    train(cfg, [root / "human"], tmp_path / "pre", model_cfg=_tiny(tok), tokenizer=tok)
    pre = load_model(tmp_path / "pre")
    size, patch = pre.cfg.vision.image_size, pre.cfg.vision.patch_size
    big = size + 2 * patch
    cfg = TrainConfig(job="finetune_captioner", epochs=1, batch_size=32, max_steps=2, image_size=big, progress=False)
    s = train(cfg, root / "human", tmp_path / "cap", init=tmp_path / "pre")
    assert s["steps"] == 2
    cap = load_model(tmp_path / "cap")
    assert cap.cfg.vision.image_size == big and cap.cfg.vision.num_tokens == 1 + (big // patch) ** 2
    assert cap.visual_encoder.pos_embed.shape[1] == cap.cfg.vision.num_tokens
    # untrained parts of the ViT came over unchanged; the interpolated grid keeps the class token's embedding
    pe_pre = pre.visual_encoder.pos_embed.detach()
    torch.testing.assert_close(load_model(tmp_path / "pre", arch="BlipCaptioner", image_size=big)
                               .visual_encoder.pos_embed[:, :1], pe_pre[:, :1])
    with pytest.raises(ValueError, match="not a multiple of .* patch size"):
        load_model(tmp_path / "pre", image_size=big + 1)


def _cli(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
    env.update(env_extra or {})
    return [sys.executable, "-m", "blip", *args], env


def _train_cmd(root, tok_dir, out, params, extra=()):
    return _cli(["pretrain", "--params", str(params), "--shards", str(root / "web"), str(root / "human"),
                 "--tokenizer", str(tok_dir), "--out", str(out),
                 "--set", "pretrain.epochs=2", "--set", "pretrain.batch_size=16", "--set", "pretrain.ckpt_every=4",
                 "--set", "pretrain.max_steps=16", "--set", "pretrain.progress=false",
                 "--set", "model.queue_size=64", "--set", "model.vision={depth: 2}",
                 "--set", "model.text={num_hidden_layers: 2}", *extra])


def test_resume_after_kill_reaches_the_same_weights(world, tmp_path):
    root, tok = world
    tok.save(tmp_path / "tok")
    params = ROOT / "params.yaml"
    # uninterrupted reference
    cmd, env = _train_cmd(root, tmp_path / "tok", tmp_path / "ref", params)
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tmp_path)
    # killed as soon as its first checkpoint exists, then started again with the same command
    cmd, env = _train_cmd(root, tmp_path / "tok", tmp_path / "run", params)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run.resume" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["position"]["global_step"]
    assert 0 < killed_at < 16
    assert not (tmp_path / "run").exists()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "resuming pretrain" in out.stdout
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _probe(out, nproc):
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_probe.py"), str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), *cmd[1:]]
    _, env = _cli([])
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    return json.loads(Path(out).read_text())


def test_two_process_gloo_matches_one_process_with_the_same_global_batch(tmp_path):
    one, two = _probe(tmp_path / "one.json", 1), _probe(tmp_path / "two.json", 2)
    # before any update ITC and LM are the same function of the same global batch
    for k in ("itc", "lm"):
        assert abs(one["history"][0][k] - two["history"][0][k]) < 1e-5, k
    # ITM draws its hard negatives from the local batch: same distribution, other draws
    assert abs(one["history"][0]["itm"] - two["history"][0]["itm"]) < 0.05
    # the queues hold every rank's momentum features in global batch order
    assert one["queue_ptr"] == two["queue_ptr"] == 24
    assert torch.allclose(torch.tensor(one["image_queue"])[:, :8], torch.tensor(two["image_queue"])[:, :8], atol=1e-5)
    for k in ("itc", "lm"):  # after three steps the runs differ only through ITM's negatives
        assert abs(one["history"][-1][k] - two["history"][-1][k]) < 2e-2, k
    assert torch.allclose(torch.tensor(one["weight"]), torch.tensor(two["weight"]), atol=1e-2)


def test_cli_relaunches_itself_under_torchrun_with_two_gloo_processes(world, tmp_path):
    root, tok = world
    tok.save(tmp_path / "tok")
    cmd, env = _train_cmd(root, tmp_path / "tok", tmp_path / "ddp", ROOT / "params.yaml",
                          extra=["--set", "pretrain.device=cpu", "--set", "compute.nproc_per_node=2",
                                 "--metrics", str(tmp_path / "m.json")])
    p = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m blip pretrain" in p.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 16  # max_steps
    assert m["steps_per_epoch"] == 640 // 16  # each rank 8 pairs per step, equal epoch length
    assert load_model(tmp_path / "ddp").load_report["missing"] == []


def test_vision_lr_scale_slows_only_the_vit():
    """``vision_lr_scale``: the ViT's groups get lr x scale from ``set_lr``; every other parameter
    the schedule's lr; weight decay split as before; the default keeps the two plain groups."""
    from blip.train.optim import param_groups, set_lr

    torch.manual_seed(0)
    model = BlipPretrain(micro_config())
    plain = param_groups(model, 0.05)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0] and [g["weight_decay"] for g in plain] == [0.05, 0.0]
    groups = param_groups(model, 0.05, vision_lr_scale=0.3)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            seen += 1
            vit = names[id(p)].startswith("visual_encoder.")
            assert g["lr"] == pytest.approx(3e-4 if vit else 1e-3), names[id(p)]
    assert seen == sum(len(g["params"]) for g in plain)  # nothing lost or duplicated
    # one step moves a ViT weight by ~lr x scale (Adam's first step is lr * sign(grad))
    w = model.visual_encoder.patch_embed.proj.weight
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    opt.step()
    assert (before - w.detach()).abs().max().item() == pytest.approx(3e-4, rel=0.05)


@pytest.mark.parametrize("arch", ["BlipPretrain", "BlipRetrieval"])
def test_vision_lr_scale_zero_freezes_the_vit_and_reuses_its_features_as_the_momentum_vits(arch):
    """``vision_lr_scale: 0`` locks the ViT (LiT): it has no gradient and no optimizer state, its
    momentum copy is the ViT itself, and the frozen model's losses equal those of an unfrozen twin
    on the first step (the momentum ViT's features are reused exactly, not approximated) — while
    the text side keeps learning."""
    from helpers_model import text_inputs

    from blip.model.blip import MODEL_CLASSES

    torch.manual_seed(0)
    twin = MODEL_CLASSES[arch](micro_config())
    frozen = MODEL_CLASSES[arch](micro_config())
    frozen.load_state_dict(twin.state_dict())
    with torch.no_grad():  # a momentum ViT that drifted from the ViT: freezing re-copies it
        for p in frozen.visual_encoder_m.parameters():
            p.add_(0.01)
    frozen.freeze_vision()
    assert frozen.vision_frozen and not twin.vision_frozen
    for a, b in zip(frozen.visual_encoder.parameters(), frozen.visual_encoder_m.parameters()):
        assert torch.equal(a, b)
    groups = param_groups(frozen, 0.05, vision_lr_scale=0.0)
    trained = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in trained for p in frozen.visual_encoder.parameters())

    image = torch.randn(6, 3, 32, 32)
    ids, mask = text_inputs(6, 12)
    extra = {"idx": torch.tensor([0, 0, 1, 2, 3, 4])} if arch == "BlipRetrieval" else {}
    vit_before = [p.detach().clone() for p in frozen.visual_encoder.parameters()]
    text_before = frozen.text_proj.weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(3):
        torch.manual_seed(step)
        losses = frozen(image, ids, mask, **extra)
        if step == 0:
            torch.manual_seed(step)
            ref = twin(image, ids, mask, **extra)
            for k in ref:
                torch.testing.assert_close(losses[k], ref[k], msg=f"{arch} {k}")
        sum(losses.values()).backward()
        assert all(p.grad is None for p in frozen.visual_encoder.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(vit_before, frozen.visual_encoder.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(frozen.visual_encoder.parameters(), frozen.visual_encoder_m.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(text_before, frozen.text_proj.weight)
    with pytest.raises(ValueError, match=r"in \[0, 10\]"):
        TrainConfig(vision_lr_scale=-0.1)


def test_cross_lr_scale_speeds_only_the_cross_attention_and_the_itm_head():
    """``cross_lr_scale``: every text layer's cross-attention and the ITM head get lr x scale,
    the ViT its own scale, everything else the schedule's lr; each parameter in exactly one group."""
    from blip.train.optim import param_groups, set_lr

    torch.manual_seed(0)
    model = BlipPretrain(micro_config())
    opt = torch.optim.AdamW(param_groups(model, 0.05, vision_lr_scale=0.5, cross_lr_scale=3.0), lr=1.0)
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    kinds = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("visual_encoder."):
            want, kind = 5e-4, "vit"
        elif ".crossattention." in name or name.startswith("itm_head."):
            want, kind = 3e-3, "cross"
        else:
            want, kind = 1e-3, "rest"
        kinds.add(kind)
        assert lr_of.pop(id(p)) == pytest.approx(want), name
    assert not lr_of and kinds == {"vit", "cross", "rest"}  # nothing extra, every kind present
    with pytest.raises(ValueError, match=r"cross_lr_scale=0.0: .* in \(0, 100\]"):
        TrainConfig(cross_lr_scale=0.0)


def test_itm_weight_scales_what_the_step_minimises_not_what_it_logs():
    from blip.train.trainer import weighted_loss

    losses = {"itc": torch.tensor(1.0), "itm": torch.tensor(0.5), "lm": torch.tensor(2.0)}
    assert float(weighted_loss(losses, TrainConfig(itm_weight=3.0))) == pytest.approx(1.0 + 1.5 + 2.0)
    assert float(weighted_loss(losses, TrainConfig())) == pytest.approx(3.5)  # BLIP's plain sum
    assert float(weighted_loss({"lm": torch.tensor(2.0)}, TrainConfig(itm_weight=3.0))) == 2.0  # the captioner
    with pytest.raises(ValueError, match=r"itm_weight=-1.0: the ITM loss's weight, >= 0"):
        TrainConfig(itm_weight=-1.0)


def test_a_locked_vit_comes_out_of_training_as_it_went_in(world, tmp_path):
    """Through the trainer: a captioner fine-tuned with ``vision_lr_scale: 0`` keeps its pre-trained
    ViT bit for bit (and its decoder learns); with the default scale the ViT moves."""
    root, tok = world
    cfg = TrainConfig(job="pretrain", epochs=1, batch_size=32, max_steps=2, progress=False)
    train(cfg, [root / "human"], tmp_path / "pre", model_cfg=_tiny(tok), tokenizer=tok)
    pre = load_model(tmp_path / "pre")
    for scale in (0.0, 1.0):
        cfg = TrainConfig(job="finetune_captioner", epochs=1, batch_size=32, max_steps=3, lr=1e-3,
                          vision_lr_scale=scale, progress=False)
        train(cfg, root / "human", tmp_path / f"cap{scale}", init=tmp_path / "pre")
        cap = load_model(tmp_path / f"cap{scale}")
        vit_same = all(torch.equal(a, b) for a, b in zip(pre.visual_encoder.state_dict().values(),
                                                          cap.visual_encoder.state_dict().values()))
        assert vit_same == (scale == 0.0), scale
        assert not torch.equal(pre.text_decoder.cls.predictions.transform.dense.weight,
                               cap.text_decoder.cls.predictions.transform.dense.weight)


def test_a_locked_vit_on_a_deterministic_transform_sees_each_image_once_per_stage(world, tmp_path):
    """``vision_cache_mib``: with the ViT frozen and no crop, flip or RandomAugment, pre-training
    computes each image's tokens once (its second epoch is all hits) and trains exactly as it does
    without the cache; a transform that moves pixels keeps the cache off."""
    root, tok = world
    runs = {}
    for mib in (2048, 0):
        tr = MemoryTracker()
        cfg = TrainConfig(job="pretrain", epochs=2, batch_size=32, lr=1e-3, warmup_steps=5, log_every=1,
                          vision_lr_scale=0.0, min_scale=1.0, augment=False, vision_cache_mib=mib, progress=False)
        runs[mib] = (train(cfg, [root / "web", root / "human"], tmp_path / f"pre{mib}", model_cfg=_tiny(tok),
                           tokenizer=tok, tracker=tr), tr.history("train/loss"))
    (cached, loss_cached), (plain, loss_plain) = runs[2048], runs[0]
    assert plain["vision_cache"] is None
    c = cached["vision_cache"]
    rows = cached["steps"] * 32
    assert c["hits"] + c["misses"] == rows
    assert c["misses"] <= 320 + 64 and c["images"] == c["misses"] and not c["full"]  # 384 images, 640 pairs an epoch
    assert c["hits"] >= rows - (320 + 64)  # every second-epoch row, and the repeats of a human image
    torch.testing.assert_close(torch.tensor(loss_cached), torch.tensor(loss_plain), rtol=1e-4, atol=1e-4)
    a, b = load_model(tmp_path / "pre2048").state_dict(), load_model(tmp_path / "pre0").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)

    cfg = TrainConfig(job="pretrain", epochs=1, batch_size=32, max_steps=2, vision_lr_scale=0.0, min_scale=0.5,
                      augment=False, progress=False)
    assert train(cfg, [root / "human"], tmp_path / "crop", model_cfg=_tiny(tok), tokenizer=tok)["vision_cache"] is None
