"""The text transformer's MLM warm start (the BERT role): corpus, masking, training, loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_model import micro_config

from blip.data.world import WorldConfig
from blip.model.blip import BlipPretrain
from blip.tokenizer import build_tokenizer
from blip.train.config import TextWarmstartConfig
from blip.train.warmstart_text import (
    CARD,
    MASK_P,
    WEIGHTS,
    load_text_init,
    mask_tokens,
    text_corpus,
    train_text,
)

WORLD32 = WorldConfig(image_size=32, n_shapes=4, n_colours=4)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(text_corpus(400, seed=5, world=WORLD32), vocab_size=100)


def _config(tok):
    cfg = micro_config()
    for k, v in tok.special_ids.items():
        setattr(cfg.text, k, v)
    return cfg


def test_corpus_is_a_pure_function_of_its_seed_and_speaks_of_the_world():
    a, b, c = text_corpus(50, 0, WORLD32), text_corpus(50, 0, WORLD32), text_corpus(50, 1, WORLD32)
    assert a == b and a != c
    assert all(t == t.lower() and t for t in a)  # cleaned as the loader cleans
    assert any(any(colour in t for colour in WORLD32.colours) for t in a)


def test_masking_follows_bert_and_spares_cls_sep_and_padding(tok):
    batch = tok(text_corpus(400, 0, WORLD32), max_length=30, padding="max_length")
    ids, att = batch.input_ids, batch.attention_mask
    inputs, labels = mask_tokens(ids, att, tok, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[att == 0].any() and not chosen[ids == tok.sep_token_id].any()
    eligible = int((att.bool() & (ids != tok.sep_token_id)).sum()) - len(ids)
    assert abs(int(chosen.sum()) / eligible - MASK_P) < 0.03
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == tok.hf.mask_token_id) & chosen
    assert 0.72 < int(masked.sum()) / int(chosen.sum()) < 0.88  # 80% [MASK]; the rest random or kept
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_train_text_learns_and_loads_into_every_text_tower(tmp_path, tok):
    cfg = _config(tok)
    ws = TextWarmstartConfig(captions=1200, held_out=200, epochs=4, batch_size=32, lr=3e-3, warmup_steps=5,
                             progress=False)
    summary = train_text(ws, cfg.text, cfg.encoder_width, WORLD32, tok, tmp_path / "ws")
    card = json.loads((tmp_path / "ws" / CARD).read_text())
    assert card["steps"] == summary["steps"] == 4 * (1000 // 32)
    assert summary["first_mlm"] > math.log(len(tok)) - 0.1  # starts at chance ...
    assert card["held_out"]["mlm_loss"] < math.log(len(tok)) - 0.5  # ... and learns the world's language
    assert card["held_out"]["masked_tokens"] > 100

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ws" / WEIGHTS))
    assert not any(".crossattention." in k for k in saved)  # cross-attention stays random, as in BLIP
    model = BlipPretrain(cfg)
    cross_before = model.text_encoder.layers[0].crossattention.self.query.weight.clone()
    load_text_init(model, tmp_path / "ws")
    layer0 = "bert.encoder.layer.0.attention.self.query.weight"
    for tower in (model.text_encoder, model.text_encoder_m, model.text_decoder.bert):
        assert torch.equal(tower.layers[0].attention.self.query.weight, saved[layer0])
        assert torch.equal(tower.embeddings.word_embeddings.weight, saved["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.text_decoder.cls.predictions.transform.dense.weight,
                       saved["cls.predictions.transform.dense.weight"])
    assert torch.equal(model.text_encoder.layers[0].crossattention.self.query.weight, cross_before)


def test_a_text_warm_start_of_another_shape_is_refused_naming_the_file(tmp_path, tok):
    cfg = _config(tok)
    ws = TextWarmstartConfig(captions=100, held_out=20, epochs=1, batch_size=32, progress=False)
    train_text(ws, cfg.text, cfg.encoder_width, WORLD32, tok, tmp_path / "ws")
    other = _config(tok)
    other.text.hidden_size, other.text.intermediate_size = 64, 128
    with pytest.raises(ValueError, match=r"text\.safetensors.*re-run warmstart_text"):
        load_text_init(BlipPretrain(other), tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match="warmstart_text"):
        load_text_init(BlipPretrain(cfg), tmp_path / "nothing")
    with pytest.raises(ValueError, match="held_out"):
        TextWarmstartConfig(captions=100, held_out=100)


def test_the_stage_switched_off_writes_its_marker_and_metrics(tmp_path):
    from blip.cli import main

    (tmp_path / "params.yaml").write_text(Path("params.yaml").read_text())
    main(["warmstart_text", "--params", str(tmp_path / "params.yaml"), "--set", "warmstart_text.enabled=false",
          "--tokenizer", str(tmp_path / "no-tokenizer-needed"), "--out", str(tmp_path / "ws"),
          "--metrics", str(tmp_path / "m.json")])
    marker = json.loads((tmp_path / "ws" / "SKIPPED.json").read_text())
    assert "warmstart_text.enabled is false" in marker["skipped"]
    assert json.loads((tmp_path / "m.json").read_text()) == marker  # DVC wants every declared output
