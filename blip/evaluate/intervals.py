"""Per-query retrieval ranks → recalls, and paired bootstrap intervals of r_mean differences.

The unit of resampling is the *image*: an image carries its own texts (about five), so a resample
draws images with replacement and scores image→text recall over the drawn images and text→image
recall over the texts of the drawn images, exactly as ``itm_eval`` would score that resampled test
set. Two models are compared on the same draw (paired): the interval of ``a − b`` then carries
only the query sampling, not the between-query variance both models share.

A ranks mapping (one split of ``data/predictions/<key>_ranks.json``, written by the ``evaluate``
stage) holds ``txt_ranks`` (N_img,: per image the 0-based best rank of its texts), ``img_ranks``
(N_txt,: per text the rank of its image), ``txt2img`` (N_txt,: the image of each text) and,
optionally, ``image_ids`` (N_img,) — two mappings are over the same queries when ``txt2img`` and
``image_ids`` are equal.

Numpy only (no torch, no scipy), so the report and the study import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
CUTS = (1, 5, 10)  # R@1, R@5, R@10: r_mean is their mean over both directions


def recalls(txt_ranks, img_ranks) -> dict[str, float]:
    """``itm_eval``'s metrics (percent) from the per-query 0-based ranks: ``txt_r1, txt_r5,
    txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean``. ``itm_eval`` returns this
    very function's result, so the two agree exactly."""
    tr1, tr5, tr10 = (float(100.0 * np.mean(np.asarray(txt_ranks) < r)) for r in CUTS)
    ir1, ir5, ir10 = (float(100.0 * np.mean(np.asarray(img_ranks) < r)) for r in CUTS)
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


def r_mean(ranks: Mapping) -> float:
    """``r_mean`` of one ranks mapping (equal to ``itm_eval``'s, bit for bit)."""
    return recalls(ranks["txt_ranks"], ranks["img_ranks"])["r_mean"]


def same_queries(a: Mapping, b: Mapping) -> str | None:
    """``None`` when ``a`` and ``b`` rank the same queries in the same order, else why not."""
    na, nb = len(a["txt_ranks"]), len(b["txt_ranks"])
    if na != nb:
        return f"{na} vs {nb} images"
    if len(a["img_ranks"]) != len(b["img_ranks"]):
        return f"{len(a['img_ranks'])} vs {len(b['img_ranks'])} texts"
    if not np.array_equal(np.asarray(a["txt2img"]), np.asarray(b["txt2img"])):
        return "the texts belong to different images (txt2img differs)"
    ids_a, ids_b = a.get("image_ids"), b.get("image_ids")
    if ids_a is not None and ids_b is not None and list(ids_a) != list(ids_b):
        first = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
        return f"image {first} is {ids_a[first]!r} in one and {ids_b[first]!r} in the other (image_ids differ)"
    return None


def _per_image(ranks: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: ``t`` = its image→text hit rate averaged over R@1/5/10, ``u`` = the same summed
    over its texts (text→image), ``n`` = its number of texts. Then for image counts ``c``:
    txt_r_mean = 100·c·t / Σc and img_r_mean = 100·c·u / c·n."""
    txt, img = np.asarray(ranks["txt_ranks"]), np.asarray(ranks["img_ranks"])
    t2i = np.asarray(ranks["txt2img"], dtype=np.int64)
    if len(t2i) != len(img):
        raise ValueError(f"txt2img has {len(t2i)} entries but img_ranks {len(img)}")
    if len(txt) == 0 or len(img) == 0:
        raise ValueError("no queries: ranks need at least one image and one text")
    t = np.mean([txt < r for r in CUTS], axis=0)
    u = np.bincount(t2i, weights=np.mean([img < r for r in CUTS], axis=0), minlength=len(txt))
    n = np.bincount(t2i, minlength=len(txt)).astype(np.float64)
    return t, u, n


def _draws(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_images)`` counts: how often each image is drawn in each resample (with
    replacement, ``n_images`` draws per resample)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(n_boot, n_images)) + np.arange(n_boot)[:, None] * n_images
    return np.bincount(idx.ravel(), minlength=n_boot * n_images).reshape(n_boot, n_images).astype(np.float64)


def _boot_diff(a: Mapping, b: Mapping, counts: np.ndarray) -> np.ndarray:
    """``r_mean(a) − r_mean(b)`` on every resample (rows of ``counts``)."""
    ta, ua, n = _per_image(a)
    tb, ub, _ = _per_image(b)
    texts = counts @ n
    return 50.0 * (counts @ (ta - tb) / counts.sum(axis=1) + counts @ (ua - ub) / np.maximum(texts, 1e-12))


def _check_pair(a: Mapping, b: Mapping, what: str = "") -> None:
    why = same_queries(a, b)
    if why:
        raise ValueError(f"{what}the two models were not ranked on the same queries: {why}")


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [alpha, 100 - alpha])
    return float(lo), float(hi)


def paired_bootstrap(ranks_a: Mapping, ranks_b: Mapping, n_boot: int = N_BOOT, seed: int = 0,
                     level: float = LEVEL) -> dict:
    """``r_mean(a) − r_mean(b)`` and its ``level`` percentile interval over ``n_boot`` paired
    resamples of the images (module docstring). Returns ``diff`` (the point difference, from the
    full query set), ``lo``, ``hi``, ``half_width`` (:func:`detectable_effect`), ``a``, ``b`` (each
    model's r_mean), ``n_images``, ``n_texts``, ``n_boot``, ``level``. Raises ``ValueError``
    when the two were not ranked on the same queries (:func:`same_queries`)."""
    _check_pair(ranks_a, ranks_b)
    n_img = len(ranks_a["txt_ranks"])
    boot = _boot_diff(ranks_a, ranks_b, _draws(n_img, n_boot, seed))
    lo, hi = _percentiles(boot, level)
    ra, rb = r_mean(ranks_a), r_mean(ranks_b)
    return {"diff": ra - rb, "lo": lo, "hi": hi, "half_width": (hi - lo) / 2, "a": ra, "b": rb,
            "n_images": n_img, "n_texts": len(ranks_a["img_ranks"]), "n_boot": n_boot, "level": level}


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile ``t_{df, q}`` (0.5 < q < 1), by integrating the density over
    θ = arctan(x) (a finite range, a bounded integrand) — numpy only; accurate to ~1e-6."""
    if df < 1 or not 0.5 < q < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < q < 1, got df={df}, q={q}")
    theta = np.linspace(0.0, math.pi / 2, 400_001)[:-1]
    x = np.tan(theta)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df)) / np.cos(theta) ** 2  # density · dx/dθ
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(theta))])
    return float(math.tan(np.interp(q, cdf, theta)))


def pooled(per_seed: Sequence[tuple[Mapping, Mapping]], n_boot: int = N_BOOT, seed: int = 0,
           level: float = LEVEL) -> dict:
    """The difference ``a − b`` over seeds: ``per_seed`` = for each training seed the two models'
    ranks on the same queries (every seed over the same queries too).

    ``mean``: the mean over seeds of the per-seed differences (``diffs``). Its interval carries
    both sources of error:

    - the query sampling: one joint bootstrap over images — the same image draw applied to every
      seed — of the seed-mean difference, percentile interval ``[mean − d_lo, mean + d_hi]``
      (``query_lo``, ``query_hi``);
    - the seed-to-seed spread: ``seed_half_width`` = t_{n−1, (1+level)/2} · s / √n of the n per-seed
      differences (s their sample std),

    added in quadrature on each side: ``lo = mean − √(d_lo² + h²)``, ``hi = mean + √(d_hi² + h²)``.
    With one seed there is no spread to estimate: the query interval alone, with ``one_seed``
    true and ``seed_half_width`` None. Also returns ``half_width`` (:func:`detectable_effect`),
    ``n_seeds``, ``n_images``, ``n_texts``, ``n_boot``, ``level``.
    """
    if not per_seed:
        raise ValueError("pooled: no seeds")
    first = per_seed[0][0]
    for i, (a, b) in enumerate(per_seed):
        _check_pair(a, b, f"seed {i}: ")
        _check_pair(first, a, f"seed {i} vs seed 0: ")
    n_img = len(first["txt_ranks"])
    counts = _draws(n_img, n_boot, seed)
    boot = np.mean([_boot_diff(a, b, counts) for a, b in per_seed], axis=0)
    diffs = [r_mean(a) - r_mean(b) for a, b in per_seed]
    mean, n = float(np.mean(diffs)), len(diffs)
    q_lo, q_hi = _percentiles(boot, level)
    d_lo, d_hi = max(mean - q_lo, 0.0), max(q_hi - mean, 0.0)
    h = None if n < 2 else t_quantile((1 + level) / 2, n - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    lo, hi = mean - math.hypot(d_lo, h or 0.0), mean + math.hypot(d_hi, h or 0.0)
    return {"mean": mean, "diffs": diffs, "lo": lo, "hi": hi, "half_width": (hi - lo) / 2,
            "query_lo": q_lo, "query_hi": q_hi, "seed_half_width": h, "one_seed": n < 2, "n_seeds": n,
            "n_images": n_img, "n_texts": len(first["img_ranks"]), "n_boot": n_boot, "level": level}


def detectable_effect(interval: Mapping) -> float:
    """The smallest effect this protocol can detect: the interval's half-width ``(hi − lo) / 2``.

    A true difference at least this large puts (about) the whole interval on its side of 0 — the
    interval's width does not depend on the difference — so the verdict can tell it from no
    effect; a smaller one leaves 0 inside the interval. ``interval``: the result of
    :func:`paired_bootstrap` or :func:`pooled` (anything with ``lo`` and ``hi``)."""
    return (float(interval["hi"]) - float(interval["lo"])) / 2


def side_of_zero(interval: Mapping) -> int:
    """+1 when the interval lies entirely above 0, −1 entirely below, 0 when it contains 0."""
    return 1 if interval["lo"] > 0 else -1 if interval["hi"] < 0 else 0
