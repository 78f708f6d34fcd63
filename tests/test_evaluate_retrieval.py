"""Retrieval evaluation: the metric against brute-force references, the pipeline against scoring
every pair, and top-k reranking touching only the ITC top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_data import small_world_fixture  # noqa: F401

from blip.data.corpus import caption_corpus
from blip.data.loader import make_loader
from blip.evaluate.intervals import r_mean, recalls
from blip.evaluate.retrieval import (
    evaluate_retrieval,
    evaluate_retrieval_ranks,
    itm_eval,
    itm_ranks,
    retrieval_scores,
)
from blip.model.blip import BlipPretrain, BlipRetrieval
from blip.model.config import load_preset
from blip.tokenizer import build_tokenizer

KEYS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]


# ---- the metric ------------------------------------------------------------------------------


def blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's own ``itm_eval`` loop (train_retrieval.py), for tie-free score matrices."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < r) for r in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < r) for r in (1, 5, 10)]
    tm, im = sum(tr) / 3, sum(ir) / 3
    return dict(zip(KEYS, [*tr, tm, *ir, im, (tm + im) / 2]))


def loop_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Plain loops with the documented tie rule: among equal scores, wrong candidates come first."""
    def best_rank(row, positives):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j in positives))
        return next(pos for pos, j in enumerate(order) if j in positives)

    tr_ranks = [best_rank(list(scores_i2t[i]), set(img2txt[i])) for i in range(len(scores_i2t))]
    ir_ranks = [best_rank(list(scores_t2i[t]), {txt2img[t]}) for t in range(len(scores_t2i))]
    tr = [100.0 * sum(r < k for r in tr_ranks) / len(tr_ranks) for k in (1, 5, 10)]
    ir = [100.0 * sum(r < k for r in ir_ranks) / len(ir_ranks) for k in (1, 5, 10)]
    tm, im = sum(tr) / 3, sum(ir) / 3
    return dict(zip(KEYS, [*tr, tm, *ir, im, (tm + im) / 2]))


def five_per_image(n_img):
    txt2img = np.repeat(np.arange(n_img), 5)
    return txt2img, [list(range(5 * i, 5 * i + 5)) for i in range(n_img)]


def assert_metrics_equal(a, b):
    assert list(a) == KEYS
    for k in KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


@pytest.mark.parametrize("seed", range(4))
def test_itm_eval_equals_blip_loop_without_ties(seed):
    rng = np.random.default_rng(seed)
    n_img = 13
    txt2img, img2txt = five_per_image(n_img)
    # a real signal so the recalls are neither 0 nor 100
    s = rng.normal(size=(n_img, 5 * n_img)) + 2.0 * (txt2img[None, :] == np.arange(n_img)[:, None])
    t = s.T + rng.normal(scale=0.5, size=s.T.shape)
    got = itm_eval(s, t, txt2img, img2txt)
    assert_metrics_equal(got, blip_itm_eval(s, t, txt2img, img2txt))
    assert_metrics_equal(itm_eval(s, t, dict(enumerate(txt2img)), dict(enumerate(img2txt))), got)  # BLIP's dicts
    assert_metrics_equal(got, loop_itm_eval(s, t, txt2img, img2txt))
    assert 0 < got["r_mean"] < 100


@pytest.mark.parametrize("seed", range(6))
def test_itm_eval_equals_loop_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_img = 11
    if seed % 2:  # uneven caption counts, 1..6 per image
        counts = rng.integers(1, 7, size=n_img)
        txt2img = np.repeat(np.arange(n_img), counts)
        img2txt = [list(np.flatnonzero(txt2img == i)) for i in range(n_img)]
    else:
        txt2img, img2txt = five_per_image(n_img)
    n_txt = len(txt2img)
    s = rng.integers(0, 4, size=(n_img, n_txt)).astype(float)  # many ties
    t = rng.integers(0, 4, size=(n_txt, n_img)).astype(float)
    s[rng.random(s.shape) < 0.5] = -100.0  # the fill of pairs outside the top-k
    t[rng.random(t.shape) < 0.5] = -100.0
    assert_metrics_equal(itm_eval(s, t, txt2img, img2txt), loop_itm_eval(s, t, txt2img, img2txt))


def test_itm_eval_ties_never_count_as_hits():
    txt2img, img2txt = five_per_image(20)
    flat = itm_eval(np.zeros((20, 100)), np.zeros((100, 20)), txt2img, img2txt)
    assert all(v == 0.0 for v in flat.values())  # a constant model retrieves nothing
    perfect = (txt2img[None, :] == np.arange(20)[:, None]).astype(float)
    assert all(v == 100.0 for v in itm_eval(perfect, perfect.T, txt2img, img2txt).values())


@pytest.mark.parametrize("seed", range(3))
def test_itm_ranks_are_the_per_query_ranks_itm_eval_scores(seed):
    """The per-query ranks (kept for the bootstrap intervals) give itm_eval's metrics exactly."""
    rng = np.random.default_rng(seed)
    n_img = 17
    txt2img, img2txt = five_per_image(n_img)
    s = rng.integers(0, 5, size=(n_img, 5 * n_img)).astype(float)  # ties included
    t = rng.integers(0, 5, size=(5 * n_img, n_img)).astype(float)
    r = itm_ranks(s, t, txt2img, img2txt, chunk=4)
    assert r["txt_ranks"].shape == (n_img,) and r["img_ranks"].shape == (5 * n_img,)
    np.testing.assert_array_equal(r["txt2img"], txt2img)
    for i in range(n_img):  # rank = wrong candidates scoring at least the best positive (ties count against)
        best = max(s[i, j] for j in img2txt[i])
        assert r["txt_ranks"][i] == sum(s[i, j] >= best for j in range(5 * n_img) if j not in img2txt[i])
    got = itm_eval(s, t, txt2img, img2txt)
    assert recalls(r["txt_ranks"], r["img_ranks"]) == got  # bit for bit
    assert r_mean({k: list(map(int, v)) for k, v in r.items()}) == got["r_mean"]  # from JSON-ready lists too


def test_itm_eval_rejects_mismatched_shapes():
    txt2img, img2txt = five_per_image(3)
    with pytest.raises(ValueError, match="transpose"):
        itm_eval(np.zeros((3, 15)), np.zeros((3, 15)), txt2img, img2txt)


# ---- model inference ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(small_world):
    tok = build_tokenizer(caption_corpus(small_world / "human"), vocab_size=300)
    cfg = load_preset("tiny", queue_size=64, vision={"depth": 2}, text={**tok.special_ids, "num_hidden_layers": 2})
    torch.manual_seed(0)
    return tok, cfg, {"BlipRetrieval": BlipRetrieval(cfg), "BlipPretrain": BlipPretrain(cfg)}


def brute_force(model, tok, shards):
    """Every (image, caption) pair scored ITM logit + ITC cosine, from the model's own methods."""
    images, texts, txt2img = [], [], []
    n = 0
    for batch in make_loader(shards, batch_size=5, image_size=model.cfg.vision.image_size, train=False):
        images.append(batch["image"])
        for caps in batch["captions"]:
            txt2img += [n] * len(caps)
            texts += caps
            n += 1
    images = torch.cat(images)
    model.eval()
    with torch.no_grad():
        embeds = model.encode_image(images)
        img_feat = model.image_features(embeds)
        t = tok(texts, max_length=35)
        txt_feat = model.text_features(t.input_ids, t.attention_mask)
        cos = img_feat @ txt_feat.T
        n_img, n_txt = cos.shape
        ii, tt = torch.meshgrid(torch.arange(n_img), torch.arange(n_txt), indexing="ij")
        ii, tt = ii.reshape(-1), tt.reshape(-1)
        logit = model.itm_logits(embeds, t.input_ids[tt], t.attention_mask[tt], ii)[:, 1].view(n_img, n_txt)
    return (logit + cos).numpy(), cos.numpy(), np.array(txt2img)


@pytest.mark.parametrize("arch", ["BlipRetrieval", "BlipPretrain"])
def test_full_k_equals_scoring_every_pair(tiny, small_world, arch):
    tok, _, models = tiny
    model = models[arch]
    full, _, txt2img = brute_force(model, tok, small_world / "val")
    model.train()
    n_img, n_txt = full.shape
    assert (n_img, n_txt) == (12, 60)
    # odd sizes: ragged image batches, ITM chunks and query groups
    s_i2t, s_t2i, t2i, i2t = retrieval_scores(model, tok, small_world / "val", k=256, batch_size=7,
                                              itm_batch_size=50, queries_per_step=5)
    assert model.training  # mode restored
    np.testing.assert_array_equal(t2i, txt2img)
    assert [list(x) for x in i2t] == [list(np.flatnonzero(txt2img == i)) for i in range(n_img)]
    # k >= candidates: every pair reranked, so the matrices are the brute-force ones
    np.testing.assert_allclose(s_i2t, full, atol=1e-4)
    np.testing.assert_allclose(s_t2i, full.T, atol=1e-4)
    metrics = evaluate_retrieval(model, tok, small_world / "val", k=256, batch_size=7)
    expected = itm_eval(full, full.T, txt2img, [np.flatnonzero(txt2img == i) for i in range(n_img)])
    assert {k: metrics[k] for k in KEYS} == pytest.approx(expected)
    assert (metrics["n_images"], metrics["n_texts"], metrics["k"]) == (12, 60, 256)
    again, ranks = evaluate_retrieval_ranks(model, tok, small_world / "val", k=256, batch_size=7)
    assert again == metrics and set(ranks) == {"txt_ranks", "img_ranks", "txt2img", "image_ids"}
    assert ranks["txt2img"] == txt2img.tolist() and r_mean(ranks) == metrics["r_mean"]
    ids = [b["image_id"].tolist() for b in make_loader(small_world / "val", batch_size=5, train=False)]
    assert ranks["image_ids"] == sum(ids, []) and len(set(ranks["image_ids"])) == n_img  # the queries, in order


def test_small_k_reranks_only_the_itc_top_k(tiny, small_world):
    tok, _, models = tiny
    model = models["BlipRetrieval"]
    full, cos, _ = brute_force(model, tok, small_world / "val")
    k = 4
    s_i2t, s_t2i, _, _ = retrieval_scores(model, tok, small_world / "val", k=k, batch_size=16)
    for scores, sims, ref in ((s_i2t, cos, full), (s_t2i, cos.T, full.T)):
        scored = scores != -100.0
        assert (scored.sum(axis=1) == k).all()
        for row in range(scores.shape[0]):
            top = set(np.argsort(-sims[row])[:k])
            assert set(np.flatnonzero(scored[row])) == top
        np.testing.assert_allclose(scores[scored], ref[scored], atol=1e-4)


def _ddp_worker(rank, world, port, root, state, special_ids, out):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from blip.tokenizer import BlipTokenizer

        tok = BlipTokenizer.load(root / "tok")
        cfg = load_preset("tiny", queue_size=64, vision={"depth": 2}, text={**special_ids, "num_hidden_layers": 2})
        model = BlipRetrieval(cfg)
        model.load_state_dict(state)
        s_i2t, s_t2i, _, _ = retrieval_scores(model, tok, root / "val", k=5, batch_size=8)
        np.save(out / f"i2t_{rank}.npy", s_i2t)
        np.save(out / f"t2i_{rank}.npy", s_t2i)
    finally:
        tdist.destroy_process_group()


def test_two_gloo_ranks_give_the_one_process_matrices(tiny, small_world, tmp_path):
    import socket

    import torch.multiprocessing as mp

    tok, _, models = tiny
    model = models["BlipRetrieval"]
    tok.save(tmp_path / "tok")
    (tmp_path / "val").symlink_to(small_world / "val")
    one_i2t, one_t2i, _, _ = retrieval_scores(model, tok, small_world / "val", k=5, batch_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path, model.state_dict(), tok.special_ids, tmp_path), nprocs=2)
    for rank in range(2):  # each rank's rows are summed into every rank's full matrices
        np.testing.assert_allclose(np.load(tmp_path / f"i2t_{rank}.npy"), one_i2t, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"t2i_{rank}.npy"), one_t2i, atol=1e-5)
