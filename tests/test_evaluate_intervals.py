"""Paired bootstrap intervals over the test images: each resample scored as itm_eval would score it,
the same draw for both models (and every seed), fast enough for 2000 draws."""

from __future__ import annotations

import time

import numpy as np
import pytest

from blip.evaluate import intervals as iv
from blip.evaluate.retrieval import itm_eval, itm_ranks


def synthetic_ranks(rng, n_img: int = 60, per_image: int = 5, skill: float = 0.4, like: dict | None = None) -> dict:
    """Ranks of a model that puts a query's answer first with probability ``skill`` (else anywhere
    in the top 30): uneven caption counts when ``per_image`` is 0; ``like``: the same queries as it."""
    counts = rng.integers(1, 7, size=n_img) if per_image == 0 else np.full(n_img, per_image)
    txt2img = np.asarray(like["txt2img"]) if like else np.repeat(np.arange(n_img), counts)

    def draw(n):
        return np.where(rng.random(n) < skill, 0, rng.integers(0, 30, size=n))

    return {"txt_ranks": draw(n_img).tolist(), "img_ranks": draw(len(txt2img)).tolist(), "txt2img": txt2img.tolist(),
            "image_ids": list(range(100, 100 + n_img))}


def expanded_r_mean(ranks: dict, images: np.ndarray) -> float:
    """The brute-force resample: the drawn images' image→text ranks and their texts' text→image ranks."""
    t2i = np.asarray(ranks["txt2img"])
    txt = np.asarray(ranks["txt_ranks"])[images]
    img = np.concatenate([np.asarray(ranks["img_ranks"])[t2i == i] for i in images])
    return iv.recalls(txt, img)["r_mean"]


def test_r_mean_from_ranks_equals_itm_eval_exactly():
    rng = np.random.default_rng(0)
    txt2img = np.repeat(np.arange(30), 5)
    s = rng.integers(0, 6, size=(30, 150)).astype(float)
    t = rng.integers(0, 6, size=(150, 30)).astype(float)
    ranks = itm_ranks(s, t, txt2img, [np.flatnonzero(txt2img == i) for i in range(30)])
    assert iv.r_mean(ranks) == itm_eval(s, t, txt2img, [np.flatnonzero(txt2img == i) for i in range(30)])["r_mean"]


@pytest.mark.parametrize("per_image", [5, 0])
def test_each_resample_is_scored_as_itm_eval_scores_the_resampled_images(per_image):
    rng = np.random.default_rng(1)
    a = synthetic_ranks(rng, per_image=per_image)
    b = synthetic_ranks(rng, skill=0.6, like=a)
    counts = iv._draws(60, 5, seed=3)
    assert counts.shape == (5, 60) and (counts.sum(axis=1) == 60).all()  # 60 draws with replacement each
    got = iv._boot_diff(a, b, counts)
    for row, c in zip(got, counts):
        images = np.repeat(np.arange(60), c.astype(int))
        assert row == pytest.approx(expanded_r_mean(a, images) - expanded_r_mean(b, images), abs=1e-9)
    no_resampling = iv._boot_diff(a, b, np.ones((1, 60)))
    assert no_resampling[0] == pytest.approx(iv.r_mean(a) - iv.r_mean(b), abs=1e-9)


def test_paired_bootstrap_difference_interval_and_detectable_effect():
    rng = np.random.default_rng(2)
    a, b = synthetic_ranks(rng, n_img=400, skill=0.7), synthetic_ranks(rng, n_img=400, skill=0.3)
    r = iv.paired_bootstrap(a, b, n_boot=500, seed=0)
    assert r["diff"] == iv.r_mean(a) - iv.r_mean(b) and r["diff"] > 10
    assert r["lo"] < r["diff"] < r["hi"] and r["lo"] > 0  # a large effect: the interval excludes 0
    assert iv.detectable_effect(r) == pytest.approx((r["hi"] - r["lo"]) / 2) == pytest.approx(r["half_width"])
    assert (r["n_images"], r["n_texts"], r["n_boot"], r["level"]) == (400, 2000, 500, 0.95)
    assert iv.paired_bootstrap(a, b, n_boot=500, seed=0) == r  # deterministic
    same = iv.paired_bootstrap(a, a, n_boot=200)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)  # paired: identical models, no spread
    wider = iv.paired_bootstrap(a, b, n_boot=500, level=0.99)
    assert wider["lo"] <= r["lo"] and wider["hi"] >= r["hi"]
    # the same queries or nothing
    other = {**b, "image_ids": [*b["image_ids"][:-1], 9999]}
    with pytest.raises(ValueError, match="image_ids differ"):
        iv.paired_bootstrap(a, other)
    with pytest.raises(ValueError, match="images"):
        iv.paired_bootstrap(a, synthetic_ranks(rng, n_img=399))


def test_two_thousand_draws_over_a_thousand_images_take_well_under_a_second():
    rng = np.random.default_rng(3)
    a, b = synthetic_ranks(rng, n_img=1000), synthetic_ranks(rng, n_img=1000)
    iv.paired_bootstrap(a, b, n_boot=20)  # warm-up
    t0 = time.perf_counter()
    r = iv.paired_bootstrap(a, b, n_boot=2000)
    assert time.perf_counter() - t0 < 1.0 and r["n_texts"] == 5000


def test_t_quantiles():
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert iv.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert iv.t_quantile(0.995, 3) == pytest.approx(5.8409, abs=1e-4)


def test_pooled_over_seeds_carries_the_query_and_the_seed_spread():
    rng = np.random.default_rng(4)
    pairs = [(synthetic_ranks(rng, n_img=300, skill=0.5 + d), synthetic_ranks(rng, n_img=300, skill=0.5))
             for d in (0.05, 0.1, 0.2)]
    p = iv.pooled(pairs, n_boot=500)
    diffs = [iv.r_mean(a) - iv.r_mean(b) for a, b in pairs]
    assert p["diffs"] == diffs and p["mean"] == pytest.approx(np.mean(diffs)) and p["n_seeds"] == 3
    h = iv.t_quantile(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert p["seed_half_width"] == pytest.approx(h) and not p["one_seed"]
    d_lo, d_hi = p["mean"] - p["query_lo"], p["query_hi"] - p["mean"]
    assert p["lo"] == pytest.approx(p["mean"] - np.hypot(d_lo, h))
    assert p["hi"] == pytest.approx(p["mean"] + np.hypot(d_hi, h))
    assert p["lo"] < p["query_lo"] and p["hi"] > p["query_hi"]  # wider than the query sampling alone
    # one draw of images for every seed: the query interval of the seed mean is the mean of the same draws
    counts = iv._draws(300, 500, 0)
    boot = np.mean([iv._boot_diff(a, b, counts) for a, b in pairs], axis=0)
    assert p["query_lo"] == pytest.approx(np.percentile(boot, 2.5))
    # one seed: the query interval alone, flagged
    one = iv.pooled(pairs[:1], n_boot=500)
    single = iv.paired_bootstrap(*pairs[0], n_boot=500)
    assert one["one_seed"] and one["seed_half_width"] is None
    assert (one["mean"], one["lo"], one["hi"]) == pytest.approx((single["diff"], single["lo"], single["hi"]))
    assert iv.detectable_effect(one) == pytest.approx(single["half_width"])
    with pytest.raises(ValueError, match="seed 1 vs seed 0"):
        iv.pooled([pairs[0], (synthetic_ranks(rng, n_img=200), synthetic_ranks(rng, n_img=200))])
    assert iv.side_of_zero({"lo": 0.1, "hi": 2}) == 1 and iv.side_of_zero({"lo": -2, "hi": -0.1}) == -1
    assert iv.side_of_zero({"lo": -0.1, "hi": 2}) == 0
