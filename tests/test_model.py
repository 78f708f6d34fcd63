"""Behaviour of the MED model: roles, sharing, queues, losses, cache, checkpoints, converters."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers_model import micro_config, perturb_, text_inputs

from blip.checkpoint import load_model, save_model
from blip.convert import from_official, load_official_file
from blip.model import losses
from blip.model.blip import BlipCaptioner, BlipPretrain, BlipRetrieval
from blip.model.config import (
    ITM_NEGATIVES,
    SHARING_STRATEGIES,
    BlipConfig,
    GenerationConfig,
    load_preset,
)
from blip.model.med import Role
from blip.model.scoring import itm_scores
from blip.typed import ConfigError


def _img(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- roles -----------------------------------------------------------------------------------
def test_roles_set_position_zero_and_attention_pattern():
    torch.manual_seed(0)
    m = BlipPretrain(micro_config()).eval()
    enc, dec = m.text_encoder, m.text_decoder
    ids, mask = text_inputs(2, 8)
    img = m.encode_image(_img(2))
    # every role overwrites position 0 with its own token, whatever the caller passed
    for role, tok in [(Role.TEXT, 2), (Role.ENCODER, 6), (Role.DECODER, 5)]:
        ids_x = ids.clone()
        ids_x[:, 0] = 99
        tower = dec.bert if role is Role.DECODER else enc
        kw = {} if role is Role.TEXT else {"image_embeds": img}
        ref = ids.clone()
        ref[:, 0] = tok
        assert torch.allclose(tower(ids_x, mask, role, **kw), tower(ref, mask, role, **kw))
    # bidirectional encoder: [CLS] output depends on a later token; causal decoder's prefix does not
    ids2 = ids.clone()
    ids2[0, 5] = 42
    assert not torch.allclose(enc(ids, mask, Role.TEXT)[0, 0], enc(ids2, mask, Role.TEXT)[0, 0])
    h1, h2 = dec.bert(ids, mask, Role.DECODER, img), dec.bert(ids2, mask, Role.DECODER, img)
    assert torch.allclose(h1[0, :5], h2[0, :5], atol=1e-6) and not torch.allclose(h1[0, 5], h2[0, 5])
    # cross-attention: the grounded encoder sees the image, the unimodal one refuses it
    assert not torch.allclose(enc(ids, mask, Role.ENCODER, img), enc(ids, mask, Role.ENCODER, img.flip(0)))
    with pytest.raises(ValueError, match="unimodal"):
        enc(ids, mask, Role.TEXT, img)
    with pytest.raises(ValueError, match="image_embeds"):
        enc(ids, mask, Role.ENCODER)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    m = BlipPretrain(micro_config()).eval()
    ids, mask = text_inputs(1, 6)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], 1)
    img = m.encode_image(_img(1))
    for tower, role, kw in [(m.text_encoder, Role.TEXT, {}), (m.text_decoder.bert, Role.DECODER, {"image_embeds": img})]:
        a = tower(ids, mask, role, **kw)
        b = tower(padded, pmask, role, **kw)[:, :6]
        assert torch.allclose(a, b, atol=1e-5)


def test_kv_cache_matches_full_recompute():
    torch.manual_seed(0)
    m = perturb_(BlipCaptioner(micro_config())).eval()
    img = m.encode_image(_img(2))
    ids, _ = text_inputs(2, 9)
    full = m.text_decoder(ids, None, img)
    cache = m.text_decoder.new_cache(img, 2, 12)
    steps = [m.text_decoder(ids[:, :4], None, None, cache=cache)]
    for t in range(4, 9):
        steps.append(m.text_decoder(ids[:, t : t + 1], None, None, cache=cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


# -- sharing (Table 3) --------------------------------------------------------------------------
def _expected_shared(strategy, names):
    skip = {"all": (), "all_except_ca": ("crossattention",), "all_except_sa": ("attention",)}.get(strategy)
    if skip is None:
        return set()
    return {n for n in names if not any(p in skip for p in n.split("."))}


@pytest.mark.parametrize("strategy", SHARING_STRATEGIES)
def test_sharing_strategy_shares_exactly_the_right_tensors(strategy):
    m = BlipPretrain(micro_config(sharing=strategy))
    enc = dict(m.text_encoder.named_parameters())
    dec = dict(m.text_decoder.bert.named_parameters())
    shared = {n for n in enc if enc[n] is dec[n]}
    assert shared == _expected_shared(strategy, enc)
    assert set(m.shared_params) == shared
    if strategy == "all_except_sa":  # BLIP: CA, FFN and embeddings shared, SA separate
        assert "encoder.layer.0.crossattention.self.query.weight" in shared
        assert "encoder.layer.0.intermediate.dense.weight" in shared
        assert "embeddings.word_embeddings.weight" in shared
        assert "encoder.layer.0.attention.self.query.weight" not in shared
    # a step on the decoder moves the encoder's shared tensors too: same storage
    for n in shared:
        assert enc[n].data_ptr() == dec[n].data_ptr()
    # the LM head is the word embedding matrix
    assert m.text_decoder.cls.predictions.decoder.weight is m.text_decoder.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize(
    "strategy, millions", [("all", 224), ("all_except_ca", 252), ("all_except_sa", 252), ("none", 361)]
)
def test_base_parameter_counts_match_paper_table3(strategy, millions):
    with torch.device("meta"):
        m = BlipPretrain(load_preset("base", sharing=strategy))
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)  # momentum copies are frozen
    assert round(n / 1e6) == millions


def test_unknown_sharing_strategy_and_config_key_fail_by_name():
    with pytest.raises(ValueError, match="all_except_sa"):
        load_preset("tiny", sharing="some")
    with pytest.raises(ConfigError, match="text.hidden"):
        BlipConfig.from_dict({"text": {"hidden": 3}})
    with pytest.raises(ConfigError, match="huge"):
        load_preset("huge")


# -- ITC: momentum, queues, temperature ---------------------------------------------------------
def test_queue_update_wraps_and_advances_pointer():
    m = BlipPretrain(micro_config(queue_size=10))
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    for step in range(3):  # 4 + 4 + 4 = 12 > 10: the third write wraps around
        m.enqueue(a + step, b - step)
    assert int(m.queue_ptr) == 2
    assert torch.equal(m.image_queue[:, 8:10], (a + 2)[:2].T)
    assert torch.equal(m.image_queue[:, 0:2], (a + 2)[2:].T)
    assert torch.equal(m.text_queue[:, 4:8], (b - 1).T)
    r = BlipRetrieval(micro_config(queue_size=6))
    r.enqueue(torch.randn(4, 16), torch.randn(4, 16), torch.tensor([7, 7, 8, 9]))
    assert r.idx_queue[0, :4].tolist() == [7, 7, 8, 9] and r.idx_queue[0, 4:].tolist() == [-100, -100]
    assert int(r.ptr_queue) == 4


def test_forward_updates_momentum_encoders_and_enqueues_momentum_features():
    torch.manual_seed(0)
    m = BlipPretrain(micro_config(queue_size=24))
    with torch.no_grad():
        for p in m.visual_encoder.parameters():
            p.add_(1.0)  # student moved away from the momentum copy
    before = m.visual_encoder_m.pos_embed.clone()
    student = m.visual_encoder.pos_embed.detach().clone()
    img, (ids, mask) = _img(4), text_inputs(4, 8)
    m(img, ids, mask, alpha=0.4)
    mom = m.cfg.momentum
    assert torch.allclose(m.visual_encoder_m.pos_embed, mom * before + (1 - mom) * student, atol=1e-6)
    with torch.no_grad():
        feat_m, _ = m.momentum_features(img, ids, mask)
    assert torch.allclose(m.image_queue[:, :4], feat_m.T, atol=1e-5)
    assert int(m.queue_ptr) == 4
    assert not m.visual_encoder_m.pos_embed.requires_grad


def test_temperature_clamped_and_itc_without_distillation_is_plain_cross_entropy():
    m = BlipPretrain(micro_config())
    with torch.no_grad():
        m.temp.fill_(5.0)
    m(_img(2), *text_inputs(2, 6))
    assert float(m.temp.detach()) == pytest.approx(0.5)
    img_f = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    txt_f = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(8, 5), dim=0)
    img_all, txt_all = torch.cat([img_f.T, queue], 1), torch.cat([txt_f.T, queue], 1)
    t = torch.tensor(0.1)
    loss, _, _ = losses.itc_loss(img_f, txt_f, img_all, txt_all, losses.diagonal_targets(3, 8, "cpu"), t, 0.0)
    ce = torch.nn.functional.cross_entropy
    ref = (ce(img_f @ txt_all / t, torch.arange(3)) + ce(txt_f @ img_all / t, torch.arange(3))) / 2
    assert torch.allclose(loss, ref, atol=1e-6)


def test_idx_targets_spread_over_same_image():
    t = losses.idx_targets(torch.tensor([1, 2, 1]), torch.tensor([1, 2, 1, 1, -100]))
    assert t[0].tolist() == [pytest.approx(1 / 3), 0, pytest.approx(1 / 3), pytest.approx(1 / 3), 0]
    assert t[1].tolist() == [0, 1, 0, 0, 0]


# -- ITM hard negatives ---------------------------------------------------------------------------
def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6) * 5 + torch.eye(6) * 50  # the positive is by far the most similar
    w = losses.hard_negative_weights(sim, torch.eye(6, dtype=torch.bool))
    draws = torch.stack([losses.sample_hard_negatives(w, g) for _ in range(300)])
    assert not (draws == torch.arange(6)).any()
    idx = torch.tensor([0, 0, 1, 1, 2, 2])  # retrieval: every caption of the same image is positive
    same = idx[:, None] == idx[None]
    w = losses.hard_negative_weights(sim, same, eps=0)
    draws = torch.stack([losses.sample_hard_negatives(w, g) for _ in range(300)])
    assert not (idx[draws] == idx).any()
    # hard: the most similar negative is drawn most often
    sim = torch.zeros(3, 3)
    sim[0, 2] = 4.0
    w = losses.hard_negative_weights(sim, torch.eye(3, dtype=torch.bool))
    draws = torch.stack([losses.sample_hard_negatives(w, g) for _ in range(400)])[:, 0]
    assert (draws == 2).float().mean() > 0.8


def _known_neighbours() -> tuple[torch.Tensor, torch.Tensor]:
    """6 pairs; row b's own pair has similarity 2. Its nearest other candidate (b+1) sits ABOVE it
    at 3 (a text that also describes the image: the false negative), the next (b+2) just below
    at 1.5, the other three far at -2."""
    n = 6
    sim = torch.full((n, n), -2.0)
    rows = torch.arange(n)
    sim[rows, rows] = 2.0
    sim[rows, (rows + 1) % n] = 3.0
    sim[rows, (rows + 2) % n] = 1.5
    return sim, torch.eye(n, dtype=torch.bool)


@pytest.mark.parametrize("kind", ITM_NEGATIVES)
def test_each_itm_negatives_choice_draws_the_negatives_it_should(kind):
    sim, positive = _known_neighbours()
    rows = torch.arange(6)
    w = losses.itm_negative_weights(sim, positive, sim.diagonal(), kind)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([losses.sample_hard_negatives(w, g) for _ in range(2000)])  # (2000, 6)
    share = {d: (draws == (rows + d) % 6).float().mean().item() for d in range(6)}  # d = 0: the positive
    assert share[0] == 0.0  # never the pair itself
    if kind == "hard":  # BLIP: in proportion to softmax(sim) -> the false negative most of the time
        expected = torch.softmax(sim[0], 0)[1] / (1 - torch.softmax(sim[0], 0)[0])
        assert share[1] == pytest.approx(expected.item(), abs=0.03) and share[1] > 0.6
    elif kind == "uniform":  # every other pair alike
        assert all(share[d] == pytest.approx(0.2, abs=0.03) for d in range(1, 6))
    else:  # below_positive: never the candidate above the positive; the nearest below it most often
        assert share[1] == 0.0
        assert share[2] > 0.85 and sum(share[d] for d in (3, 4, 5)) == pytest.approx(1 - share[2], abs=1e-6)


def test_below_positive_falls_back_to_hard_when_nothing_is_below():
    sim, positive = _known_neighbours()
    sim.fill_diagonal_(-5.0)  # every candidate above the positive: no admissible negative
    w = losses.itm_negative_weights(sim, positive, sim.diagonal(), "below_positive")
    assert torch.equal(w, losses.itm_negative_weights(sim, positive, sim.diagonal(), "hard"))  # as hard: never a positive
    assert (w[positive] == 0).all() and (w.sum(1) > 0).all()
    draws = losses.sample_hard_negatives(w, torch.Generator().manual_seed(0))
    assert not (draws == torch.arange(6)).any()
    with pytest.raises(ValueError, match="itm_negatives='nearest' unknown"):
        losses.itm_negative_weights(sim, positive, sim.diagonal(), "nearest")


@pytest.mark.parametrize("kind", ITM_NEGATIVES)
def test_models_draw_itm_negatives_by_their_setting(kind):
    """The models' forward uses ``itm_negatives``: weights from the model equal the loss module's
    for the same similarities (the own pair on the diagonal, or at this rank's offset), and a
    training step runs with every choice."""
    torch.manual_seed(0)
    cfg = micro_config()
    sim, positive = _known_neighbours()
    for model in (BlipPretrain(cfg), BlipRetrieval(cfg)):
        model.itm_negatives = kind
        expected = losses.itm_negative_weights(sim, positive, sim.diagonal(), kind)
        assert torch.equal(model.negative_weights(sim, positive), expected)
        wide = torch.cat([torch.full((6, 6), -9.0), sim], 1)  # rank 1 of 2: own columns 6..11
        wide_pos = torch.cat([torch.zeros_like(positive), positive], 1)
        assert torch.equal(model.negative_weights(wide, wide_pos, own=slice(6, 12)),
                           losses.itm_negative_weights(wide, wide_pos, sim.diagonal(), kind))
        ids, mask = text_inputs(4, 8)
        image = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
        extra = {"idx": torch.tensor([0, 1, 2, 3])} if isinstance(model, BlipRetrieval) else {}
        out = model(image, ids, mask, **extra)
        assert torch.isfinite(out["itm"]) and out["itm"].requires_grad


def test_training_sections_set_the_models_itm_negatives(tmp_path):
    from helpers_model import micro_preset

    from blip.tokenizer import build_tokenizer
    from blip.train.config import TrainConfig
    from blip.train.jobs import build_model

    with pytest.raises(ValueError, match="itm_negatives='soft' unknown"):
        TrainConfig(itm_negatives="soft")
    assert TrainConfig().itm_negatives == "hard"  # BLIP's, unless params.yaml says otherwise
    torch.manual_seed(0)
    tok = build_tokenizer(["a red circle on the left", "two blue squares above a star"], vocab_size=64)
    model, _ = build_model(TrainConfig(job="pretrain", itm_negatives="below_positive"), None, micro_preset(tok), tok)
    assert isinstance(model, BlipPretrain) and model.itm_negatives == "below_positive"
    save_model(model, tmp_path / "pre")
    for job, cls in (("finetune_filter", BlipRetrieval), ("finetune_shared", BlipPretrain)):
        model, _ = build_model(TrainConfig(job=job, itm_negatives="uniform", itm_negatives_per_pair=2),
                               tmp_path / "pre", None, tok)
        assert isinstance(model, cls) and model.itm_negatives == "uniform" and model.itm_negatives_per_pair == 2


def _itm_negative_texts(model, image, ids, mask, idx):
    """The texts the ITM branch of one forward pairs with the batch's images as negatives
    (the last third of the image-grounded encoder's rows), seen through a forward pre-hook."""
    seen = []

    def grab(_module, args, kwargs):
        role = args[2] if len(args) > 2 else kwargs.get("role")
        if role == Role.ENCODER:
            seen.append(args[0].clone())

    handle = model.text_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(image, ids, mask, idx=idx)
    finally:
        handle.remove()
    (itm_ids,) = seen
    return itm_ids[2 * ids.shape[0]:]


@pytest.mark.parametrize("kind", ITM_NEGATIVES)
def test_itm_negative_texts_from_the_queue(kind):
    """``itm_negatives_from: queue``: the texts behind the ITC queue are kept beside its features,
    and a batch whose texts are all of one image (no negative in the batch) takes its negative
    texts from the queue — never a text of the same image, never an unwritten column."""
    torch.manual_seed(0)
    cfg = micro_config(queue_size=16)
    model = BlipRetrieval(cfg)
    model.itm_negatives, model.itm_negatives_from = kind, "queue"
    image = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids_a, mask_a = text_inputs(4, 8, seed=1)
    model(image, ids_a, mask_a, idx=torch.tensor([0, 1, 2, 3]))
    pool_ids, pool_mask = model._text_pool()
    assert torch.equal(pool_ids[:4, :8], ids_a) and torch.equal(pool_mask[:4, :8], mask_a)
    assert int(pool_mask[4:].sum()) == 0  # never written: excluded (image id -1)
    cand_ids, cand_mask, cand_idx = model.itm_text_candidates(ids_a, mask_a, torch.tensor([9, 9, 9, 9]))
    assert cand_ids.shape[0] == 4 + 16 and cand_idx[4:8].tolist() == [0, 1, 2, 3] and (cand_idx[8:] == -1).all()
    ids_b, mask_b = text_inputs(4, 10, seed=2)  # wider than the pool so far: the pool widens
    for _ in range(3):  # 4 + 4 + 4 of 16 columns: ids_a stays queued
        negs = _itm_negative_texts(model, image, ids_b, mask_b, torch.tensor([5, 5, 5, 5]))
        queued_a = {tuple(r[m.bool()].tolist()) for r, m in zip(ids_a, mask_a)}
        for row in negs:
            assert tuple(row[row != 0].tolist()) in queued_a  # a text of the queue, of another image
    batch_model = BlipRetrieval(cfg)  # BLIP's in-batch draw has nothing else to take
    batch_model.itm_negatives = kind
    negs = _itm_negative_texts(batch_model, image, ids_b, mask_b, torch.tensor([5, 5, 5, 5]))
    assert {tuple(r.tolist()) for r in negs} <= {tuple(r.tolist()) for r in ids_b}


def test_itm_negatives_from_the_queue_only_in_the_filters_fine_tune():
    from blip.train.config import TrainConfig

    assert TrainConfig(job="finetune_filter", itm_negatives_from="queue").itm_negatives_from == "queue"
    with pytest.raises(ValueError, match="only the filter's fine-tune"):
        TrainConfig(job="pretrain", itm_negatives_from="queue")
    with pytest.raises(ValueError, match="itm_negatives_from='pool' unknown"):
        TrainConfig(job="finetune_filter", itm_negatives_from="pool")


def test_hard_negatives_fall_back_when_a_row_has_no_negative():
    w = torch.zeros(3, 3)  # e.g. every sample of the batch from one image
    draws = losses.sample_hard_negatives(w, torch.Generator().manual_seed(0))
    assert not (draws == torch.arange(3)).any()


def test_itm_batch_layout_labels():
    assert losses.itm_labels(2, "cpu").tolist() == [1, 1, 0, 0, 0, 0]
    assert losses.itm_labels(2, "cpu", per_pair=2).tolist() == [1, 1] + [0] * 8


def test_itm_with_k_negatives_per_pair_keeps_blips_class_balance():
    """``itm_negatives_per_pair: k``: each negative weighs 1/k, so a head that outputs the same
    logits for every row has BLIP's loss at any k, and k = 1 is BLIP's plain mean."""
    torch.manual_seed(0)
    logits = torch.randn(1, 2).expand(2 + 2 * 2 * 3, 2)  # B = 2, k = 3: the same row everywhere
    blip_layout = logits[: 2 + 2 * 2]
    assert torch.allclose(losses.itm_cross_entropy(logits, 2, 3), losses.itm_cross_entropy(blip_layout, 2, 1))
    free = torch.randn(6, 2)
    assert torch.equal(losses.itm_cross_entropy(free, 2), F.cross_entropy(free, losses.itm_labels(2, "cpu")))
    # k distinct draws where a row has k admissible columns; with replacement where it has fewer
    w = torch.ones(4, 6).fill_diagonal_(0)
    draws = losses.sample_hard_negatives(w, torch.Generator().manual_seed(0), k=3)
    assert draws.shape == (4, 3) and all(len(set(r.tolist())) == 3 for r in draws)
    assert not (draws == torch.arange(4).view(-1, 1)).any()
    w[0] = 0
    w[0, 5] = 1.0  # one admissible column
    assert losses.sample_hard_negatives(w, torch.Generator().manual_seed(0), k=3)[0].tolist() == [5, 5, 5]


def test_itm_scores_k_negatives_of_each_kind_per_positive():
    """A forward with ``itm_negatives_per_pair = 3`` scores (1 + 2*3) rows per sample through the
    image-grounded encoder: the positives, 3 other images per text, 3 other texts per image
    (never the sample's own), and trains; ``TrainConfig`` rejects k < 1."""
    from blip.train.config import TrainConfig

    torch.manual_seed(0)
    cfg = micro_config()
    model = BlipRetrieval(cfg)
    model.itm_negatives, model.itm_negatives_per_pair = "uniform", 3
    image = torch.randn(5, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids, mask = text_inputs(5, 8, seed=3)
    seen = []

    def grab(_module, args, kwargs):
        if (args[2] if len(args) > 2 else kwargs.get("role")) == Role.ENCODER:
            seen.append((args[0].clone(), kwargs.get("image_index")))

    handle = model.text_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(image, ids, mask, idx=torch.arange(5))
    finally:
        handle.remove()
    ((itm_ids, image_index),) = seen
    assert itm_ids.shape[0] == 5 * 7 and torch.isfinite(out["itm"]) and out["itm"].requires_grad
    own = torch.arange(5)
    neg_images = image_index[5:20].view(3, 5)  # the k-th draw of every text, k = 0..2
    assert not (neg_images == own).any() and all(len(set(c.tolist())) == 3 for c in neg_images.T)
    neg_texts = itm_ids[20:].view(3, 5, -1)
    for k in range(3):
        assert not any(torch.equal(neg_texts[k, b], ids[b]) for b in range(5))
    with pytest.raises(ValueError, match="itm_negatives_per_pair=0: negatives of each kind per positive"):
        TrainConfig(itm_negatives_per_pair=0)


def test_all_rank_itm_on_one_rank_is_the_local_itm():
    """``negative_all_rank`` gathers every rank's batch before the draw; on one rank the gathered
    batch is the local one, so with the same draws its ITM loss is the local path's, exactly."""
    torch.manual_seed(0)
    cfg = micro_config()
    model = perturb_(BlipRetrieval(cfg, negative_all_rank=True)).eval()
    image = _img(4, cfg.vision.image_size, seed=1)
    ids, mask = text_inputs(4, 8, seed=2)
    idx = torch.tensor([0, 1, 1, 2]).view(-1, 1)  # two texts of image 1: never each other's negative
    with torch.no_grad():
        image_embeds = model.encode_image(image)
        image_feat, text_feat = model.image_features(image_embeds), model.text_features(ids, mask)
        torch.manual_seed(7)
        gathered = model._itm_all_rank(image_embeds, image_feat, text_feat, ids, mask, idx)
        same = idx == idx.T
        w_t2i = model.negative_weights(text_feat @ image_feat.T / model.temp, same, eps=0)
        w_i2t = model.negative_weights(image_feat @ text_feat.T / model.temp, same, eps=0)
        torch.manual_seed(7)
        local = model.itm_loss(image_embeds, ids, mask, w_t2i, w_i2t)
    assert torch.isfinite(gathered) and torch.allclose(gathered, local, atol=1e-6)


# -- LM: label smoothing and prompt masking -----------------------------------------------------
def test_lm_loss_masks_prompt_and_padding_and_smooths_labels():
    ids = torch.tensor([[2, 10, 11, 12, 40, 41, 3, 0]])
    mask = (ids != 0).long()
    labels = losses.lm_labels(ids, mask, prompt_length=4)
    assert labels.tolist() == [[-100, -100, -100, -100, 40, 41, 3, -100]]
    logits = torch.randn(1, 8, 50)
    loss = losses.lm_loss(logits, labels, 0.1)
    # only targets 40, 41, 3 (predicted from positions 3, 4, 5) count, with smoothing 0.1
    lp = logits[0, 3:6].log_softmax(-1)
    tgt = torch.tensor([40, 41, 3])
    ref = (0.9 * -lp[torch.arange(3), tgt] + 0.1 * -lp.mean(-1)).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    logits2 = logits.clone()
    logits2[0, :3] = torch.randn(3, 50)  # predictions of prompt tokens do not matter
    assert torch.allclose(losses.lm_loss(logits2, labels, 0.1), loss)


def test_captioner_loss_ignores_prompt_tokens():
    torch.manual_seed(0)
    m = BlipCaptioner(micro_config()).eval()
    img = _img(2)
    ids, mask = text_inputs(2, 10)
    a = m(img, ids, mask, prompt_length=4)["lm"]
    b = m(img, ids, mask, prompt_length=0)["lm"]
    assert not torch.allclose(a, b)


def test_alpha_ramp():
    assert losses.alpha_ramp(0.4, 0, 100) == 0
    assert losses.alpha_ramp(0.4, 50, 100) == pytest.approx(0.2)
    assert losses.alpha_ramp(0.4, 500, 100) == pytest.approx(0.4)


# -- generation ---------------------------------------------------------------------------------
def test_nucleus_sampling_is_deterministic_under_seeds_and_batch_independent():
    torch.manual_seed(0)
    m = perturb_(BlipCaptioner(micro_config())).eval()
    img = _img(3, seed=4)
    cfg = GenerationConfig.nucleus(max_length=14, min_length=5)
    a = m.generate(img, [2, 10, 11, 12], cfg, seeds=[1, 2, 3])
    b = m.generate(img, [2, 10, 11, 12], cfg, seeds=[1, 2, 3])
    assert torch.equal(a, b)
    c = m.generate(img, [2, 10, 11, 12], cfg, seeds=[7, 8, 9])
    assert not torch.equal(a, c)
    alone = m.generate(img[1:2], [2, 10, 11, 12], cfg, seeds=[2])
    assert alone[0].tolist() == a[1, : alone.shape[1]].tolist()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(m.generate(img, [2, 10], cfg, generator=g1), m.generate(img, [2, 10], cfg, generator=g2))


def test_generation_respects_min_and_max_length():
    torch.manual_seed(0)
    m = perturb_(BlipCaptioner(micro_config())).eval()
    with torch.no_grad():
        m.text_decoder.cls.predictions.bias[3] += 50.0  # the model wants to stop at once
    img = _img(2)
    for method in ("greedy", "beam", "nucleus"):
        out = m.generate(img, [2, 10, 11, 12], GenerationConfig(method=method, max_length=12, min_length=7), seeds=[0, 1])
        assert out.shape[1] <= 12
        for row in out.tolist():
            assert row.index(3) == 7  # EOS at the first position allowed (length 8 >= min 7)
    with torch.no_grad():
        m.text_decoder.cls.predictions.bias[3] -= 100.0  # now it never wants to stop
    out = m.generate(img, [2, 10, 11, 12], GenerationConfig(method="beam", max_length=12, min_length=5))
    assert out.shape[1] == 12


# -- scoring --------------------------------------------------------------------------------------
def test_itm_scores_with_image_index_match_pairwise():
    torch.manual_seed(0)
    m = perturb_(BlipRetrieval(micro_config())).eval()
    img = _img(2)
    emb = m.encode_image(img)
    ids, mask = text_inputs(4, 9)
    index = torch.tensor([0, 0, 1, 1])
    s = itm_scores(m, emb, ids, mask, image_index=index, batch_size=3)
    with torch.no_grad():
        ref = m.itm_logits(emb[index], ids, mask)
    assert torch.allclose(s.logit, ref[:, 1], atol=1e-5)
    assert torch.allclose(s.prob, ref.softmax(-1)[:, 1], atol=1e-6)
    assert ((s.prob >= 0) & (s.prob <= 1)).all()


# -- checkpoints and converters -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [BlipPretrain, BlipRetrieval, BlipCaptioner])
def test_save_load_round_trip(tmp_path, cls):
    torch.manual_seed(0)
    m = perturb_(cls(micro_config(sharing="all_except_sa"))).eval()
    path = save_model(m, tmp_path / "ckpt")
    assert (path / "model.safetensors").exists() and json.loads((path / "config.json").read_text())["arch"] == cls.__name__
    assert not list(tmp_path.glob(".ckpt*"))  # no temp leftovers
    m2 = load_model(path).eval()
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if cls is BlipPretrain:  # ties survive the round trip
        assert m2.text_encoder.encoder.layer[0].crossattention.self.query.weight is (
            m2.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight
        )
    save_model(m2, path)  # overwrite in place
    assert load_model(path).state_dict().keys() == a.keys()


def test_captioner_and_filter_from_pretrained_checkpoint(tmp_path):
    torch.manual_seed(0)
    pre = perturb_(BlipPretrain(micro_config()))
    save_model(pre, tmp_path / "pre")
    cap = load_model(tmp_path / "pre", arch="BlipCaptioner")
    assert torch.equal(cap.text_decoder.cls.predictions.bias, pre.text_decoder.cls.predictions.bias)
    filt = load_model(tmp_path / "pre", arch="BlipRetrieval")
    assert torch.equal(filt.itm_head.weight, pre.itm_head.weight)
    assert "idx_queue" in filt.load_report["missing"]


def test_official_state_dict_loads_with_position_ids_and_pos_embed_interpolation(tmp_path):
    torch.manual_seed(0)
    src = perturb_(BlipPretrain(micro_config()))
    sd = dict(src.state_dict())
    sd["text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    sd["text_decoder.bert.embeddings.position_ids"] = torch.arange(40)[None]
    torch.save({"model": sd, "epoch": 3}, tmp_path / "model_base.pth")
    cfg = micro_config()
    cfg.vision.image_size = 48  # fine-tuning at a higher resolution: 4x4 -> 6x6 grid
    target = BlipCaptioner(cfg)
    report = from_official(load_official_file(tmp_path / "model_base.pth"), target)
    assert report["missing"] == []
    assert "text_encoder.embeddings.LayerNorm.bias" in report["unexpected"]  # a tower captioners lack
    assert not any(k.endswith("position_ids") for k in report["unexpected"])  # dropped on purpose
    assert target.visual_encoder.pos_embed.shape == (1, 37, 32)
    assert torch.equal(target.visual_encoder.pos_embed[:, 0], src.visual_encoder.pos_embed[:, 0])
    assert torch.equal(target.text_decoder.bert.embeddings.word_embeddings.weight,
                       src.text_decoder.bert.embeddings.word_embeddings.weight)
    target.generate(_img(1, size=48), [2, 10], GenerationConfig(max_length=8))


def test_shape_mismatch_names_the_key(tmp_path):
    save_model(BlipCaptioner(micro_config()), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["config"]["text"]["vocab_size"] = 120
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="word_embeddings"):
        load_model(tmp_path / "c")


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = BlipCaptioner(micro_config())
    m.train()
    for mod in m.modules():  # no randomness, so both passes compute the same function
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "dropout_p"):
            mod.dropout_p = 0.0
    img, (ids, mask) = _img(2), text_inputs(2, 8)
    m(img, ids, mask)["lm"].backward()
    g1 = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(img, ids, mask)["lm"].backward()
    g2 = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_caption_strings_have_the_prompt_stripped():
    from blip.tokenizer import build_tokenizer

    tok = build_tokenizer(["a picture of a red square", "a picture of two blue circles"] * 5, vocab_size=60)
    torch.manual_seed(0)
    cfg = micro_config()
    cfg.text.vocab_size = len(tok)
    for k, v in tok.special_ids.items():
        setattr(cfg.text, k, v)
    m = BlipCaptioner(cfg).eval()
    with torch.no_grad():  # a decoder that can only say "red", until max_length
        bias = m.text_decoder.cls.predictions.bias
        bias.fill_(-1e4)
        bias[tok.hf.convert_tokens_to_ids("red")] = 1.0
        m.text_decoder.cls.predictions.decoder.weight.zero_()
    for method in ("beam", "greedy"):
        caps = m.caption(_img(2), tok, GenerationConfig(method=method, max_length=8, min_length=5))
        assert caps == ["red red red red"] * 2


def test_nucleus_sampler_draws_from_the_renormalised_nucleus_on_both_paths():
    from blip.model.generation import _candidates, _sample_nucleus

    torch.manual_seed(0)
    scores = torch.randn(1, 500) * 2  # a nucleus of 44 tokens
    p = scores.softmax(-1)[0]
    sp, si = p.sort(descending=True)
    nucleus = si[(sp.cumsum(0) - sp) < 0.9]  # top-p alone: kept while the mass ranked above is < top_p
    assert 4 < len(nucleus) < 256
    target = torch.zeros(500)
    target[nucleus] = p[nucleus] / p[nucleus].sum()
    u = torch.rand(20000, 1)
    rows = scores.expand(20000, -1).contiguous()
    assert _candidates(scores, 0, 0.9, k=256)[2].all() and not _candidates(scores, 0, 0.9, k=4)[2].any()
    fast = _sample_nucleus(rows, 0, 0.9, u, k=256)  # nucleus inside the top 256
    full = _sample_nucleus(rows, 0, 0.9, u, k=4)  # falls back to the whole vocabulary
    assert torch.equal(fast, full)
    assert set(fast.unique().tolist()) <= set(nucleus.tolist())
    freq = torch.bincount(fast, minlength=500).float() / len(fast)
    assert (freq - target).abs().max() < 0.01
