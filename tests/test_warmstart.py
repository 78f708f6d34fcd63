"""The ViT's supervised warm start (the ImageNet role): labels, the labelled set, training, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_model import micro_config

from blip.data.world import Group, Scene, WorldConfig
from blip.model.blip import BlipPretrain
from blip.train.config import WarmstartConfig
from blip.train.warmstart import (
    CARD,
    WEIGHTS,
    label_groups,
    label_names,
    labelled_set,
    check_vision_init,
    load_vision_init,
    scene_labels,
    train_vision,
)

WORLD32 = WorldConfig(image_size=32, n_shapes=4, n_colours=4)


def test_scene_labels_mark_what_is_in_the_scene():
    names = label_names(WORLD32)
    scene = Scene((Group("circle", "red", "small", 2), Group("square", "blue", "large", 1)), "left_of", "striped")
    y = scene_labels(scene, names)
    on = {names[i] for i in np.flatnonzero(y)}
    assert on == {"shape:circle", "shape:square", "colour:red", "colour:blue", "object:red circle",
                  "object:blue square", "size:small", "size:large", "objects:3", "layout:left_of",
                  "background:striped"}
    groups = label_groups(names)
    assert list(groups) == ["shape", "colour", "object", "size", "objects", "layout", "background"]
    assert len(groups["object"]) == 4 * 4 and sum(map(len, groups.values())) == len(names)


def test_labelled_set_is_a_pure_function_of_its_seed():
    a_img, a_y, _ = labelled_set(6, seed=0, world=WORLD32)
    b_img, b_y, _ = labelled_set(6, seed=0, world=WORLD32)
    c_img, _, _ = labelled_set(6, seed=1, world=WORLD32)
    assert a_img.dtype == torch.uint8 and a_img.shape == (6, 3, 32, 32)
    assert torch.equal(a_img, b_img) and torch.equal(a_y, b_y)
    assert not torch.equal(a_img, c_img)
    assert (a_y.sum(1) >= 7).all()  # every image: >= 1 shape, colour, object, size, count, layout, background


def test_train_vision_writes_a_warm_start_that_loads_into_both_vits(tmp_path):
    cfg = micro_config()
    ws = WarmstartConfig(images=96, held_out=32, epochs=3, batch_size=16, warmup_steps=2, lr=2e-3, progress=False)
    summary = train_vision(ws, cfg.vision, WORLD32, tmp_path / "ws")
    card = json.loads((tmp_path / "ws" / CARD).read_text())
    assert (tmp_path / "ws" / WEIGHTS).is_file() and card["steps"] == summary["steps"] == 3 * (64 // 16)
    assert card["labels"] == label_names(WORLD32)
    assert set(card["held_out"]) >= {"colour/auc", "shape/auc", "objects/auc", "layout/auc"}
    assert summary["final_bce"] < summary["first_bce"]  # it learned something of the labels

    model = BlipPretrain(cfg)
    assert not torch.equal(model.visual_encoder.pos_embed, _saved(tmp_path / "ws")["pos_embed"])
    load_vision_init(model, tmp_path / "ws")
    saved = _saved(tmp_path / "ws")
    for name, value in model.visual_encoder.state_dict().items():
        assert torch.equal(value, saved[name]), name
        assert torch.equal(model.visual_encoder_m.state_dict()[name], saved[name]), name


def test_a_warm_start_of_another_vit_is_refused_naming_the_file(tmp_path):
    cfg = micro_config()
    ws = WarmstartConfig(images=40, held_out=8, epochs=1, batch_size=16, progress=False)
    train_vision(ws, cfg.vision, WORLD32, tmp_path / "ws")
    other = micro_config()
    other.vision = type(cfg.vision)(image_size=32, patch_size=8, width=48, depth=2, heads=2)
    with pytest.raises(ValueError, match=r"vision\.safetensors.*re-run warmstart_vision"):
        load_vision_init(BlipPretrain(other), tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match="warmstart_vision"):
        load_vision_init(BlipPretrain(cfg), tmp_path / "nothing")


def test_a_warm_start_of_another_world_is_refused_with_the_rebuild_command(tmp_path):
    cfg = micro_config()
    ws = WarmstartConfig(images=40, held_out=8, epochs=1, batch_size=16, progress=False)
    train_vision(ws, cfg.vision, WORLD32, tmp_path / "ws")
    check_vision_init(tmp_path / "ws", WORLD32, cfg.vision)  # its own world and ViT: fine
    bigger = WorldConfig(image_size=32, n_shapes=4, n_colours=4, object_scale=1.3)
    with pytest.raises(ValueError, match=r"world\.object_scale: warm start 1\.0, this run 1\.3.*dvc unfreeze warmstart_vision"):
        check_vision_init(tmp_path / "ws", bigger, cfg.vision)


def test_warmstart_config_rejects_a_held_out_set_as_big_as_the_set():
    with pytest.raises(ValueError, match="held_out"):
        WarmstartConfig(images=100, held_out=100)


def _saved(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / WEIGHTS))
