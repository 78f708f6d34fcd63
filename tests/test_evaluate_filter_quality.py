"""Filter quality against the generator's noise labels: a hand-made case with known answers,
then real generated web shards with a score table written as the filter worker writes it."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_data import small_world_fixture  # noqa: F401

from blip.data.labels import noise_labels
from blip.evaluate.filter_quality import (
    evaluate_filter,
    filter_metrics,
    load_filter_scores,
    roc_auc,
)


def pairwise_auc(scores, positive):
    """P(score of a positive > score of a negative), ties 1/2: the definition, by brute force."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_known_values_and_ties():
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5] * 6, [1, 0, 1, 0, 1, 0]) == 0.5
    assert roc_auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == 0.875  # the tie counts one half
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 5, size=40).astype(float)
        y = rng.random(40) < 0.4
        assert roc_auc(s, y) == pytest.approx(pairwise_auc(s, y), abs=1e-12)


# key: (label, ITM p(match), ITC cosine); the filter keeps p >= 0.5
HAND = {
    "k0": (None, 0.9, 0.5),
    "k1": (None, 0.8, 0.4),
    "k2": (None, 0.3, 0.45),  # clean, dropped: false positive
    "k3": (None, 0.6, 0.1),
    "k4": (None, 0.5, 0.3),  # p == threshold: kept
    "k5": ("unrelated", 0.1, 0.05),
    "k6": ("unrelated", 0.2, 0.35),
    "k7": ("spam", 0.05, 0.0),
    "k8": ("wrong_count", 0.7, 0.6),  # missed
    "k9": ("wrong_attribute", 0.5, 0.2),  # missed (kept at the threshold)
}


def test_hand_made_case_has_the_known_answers(caplog):
    labels = {k: v[0] for k, v in HAND.items()} | {"k10": None, "k11": "spam"}  # k10, k11: no usable score
    itm = {k: v[1] for k, v in HAND.items()} | {"k11": float("nan"), "stranger": 0.1}
    itc = {k: v[2] for k, v in HAND.items()} | {"k11": 0.0, "stranger": 0.0}
    m = filter_metrics(itm, labels, itc=itc, threshold=0.5)
    # dropped: k2 k5 k6 k7 -> TP 3, FP 1, FN 2, TN 4
    assert (m["n"], m["n_noisy"], m["n_missing"], m["n_unknown"], m["n_dropped"]) == (10, 5, 2, 1, 4)
    assert m["noise_rate"] == 0.5 and m["drop_rate"] == 0.4
    assert m["precision"] == 0.75 and m["recall"] == 0.6 and m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == 0.7 and m["clean_drop_rate"] == 0.2 and m["kept_noise_rate"] == pytest.approx(1 / 3)
    # AUC of 1 - p: noisy below clean in 20 of 25 pairs, one tie (0.5 vs 0.5) -> 20.5 / 25
    assert m["auc"] == pytest.approx(0.82)
    # per kind, the AUC against the clean p's (0.9 0.8 0.3 0.6 0.5): wrong_count 0.7 is below 2 of 5,
    # wrong_attribute 0.5 below 3 and tied with 1 -> 3.5 / 5
    assert m["per_kind"] == {"unrelated": {"count": 2, "recall": 1.0, "auc": 1.0},
                             "wrong_attribute": {"count": 1, "recall": 0.0, "auc": 0.7},
                             "wrong_count": {"count": 1, "recall": 0.0, "auc": 0.4},
                             "spam": {"count": 1, "recall": 1.0, "auc": 1.0}}
    assert list(m["per_kind"]) == ["unrelated", "wrong_attribute", "wrong_count", "spam"]  # NOISE_KINDS order
    # ITC baseline drops the 4 lowest cosines: k7 k5 k3 k9 -> TP 3, FP 1
    b = m["itc_baseline"]
    assert b["n_dropped"] == 4 and b["threshold"] == 0.2
    assert b["precision"] == 0.75 and b["recall"] == 0.6 and b["clean_drop_rate"] == 0.2
    # the cosine's per-kind AUC: unrelated 0.05 is below all 5 clean cosines, 0.35 below 3 of them -> 8 / 10
    assert b["per_kind"]["unrelated"] == {"count": 2, "recall": 0.5, "auc": 0.8}
    assert b["per_kind"]["wrong_attribute"]["recall"] == 1.0
    assert b["auc"] == pytest.approx(17 / 25)
    assert "no ITM score" in caplog.text and "no noise label" in caplog.text


def test_threshold_moves_the_drops_and_undefined_ratios_are_nan():
    labels = {k: v[0] for k, v in HAND.items()}
    itm = {k: v[1] for k, v in HAND.items()}
    m = filter_metrics(itm, labels, threshold=0.0)  # drops nothing
    assert m["n_dropped"] == 0 and math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["skipped"] == {"itc_baseline": "no ITC cosines given"} and "itc_baseline" not in m
    assert filter_metrics(itm, labels, threshold=0.55)["per_kind"]["wrong_attribute"]["recall"] == 1.0
    with pytest.raises(ValueError, match="same web split"):
        filter_metrics({"x": 0.1}, labels)


def test_generated_shards_and_a_parquet_score_table(small_world, tmp_path):
    web = small_world / "web"
    labels = noise_labels(web)
    keys = sorted(labels)
    noisy = [k for k in keys if labels[k] is not None]
    clean = [k for k in keys if labels[k] is None]
    assert len(keys) == 120 and len(noisy) > 10 and len(clean) > 10
    missed, false_drops = set(noisy[:3]), set(clean[:2])
    itm = {k: (0.9 if k in missed else 0.2) if labels[k] else (0.1 if k in false_drops else 0.8) for k in keys}
    itc = {k: -itm[k] if k in missed else itm[k] for k in keys}  # the cosine also ranks the missed ones lowest
    out = tmp_path / "filter"
    out.mkdir()
    for shard in sorted({k[:5] for k in keys}):  # one parquet file per web shard, as the worker writes
        ks = [k for k in keys if k.startswith(shard)]
        table = pa.table({"key": ks, "itm_web": [itm[k] for k in ks], "itc_web": [itc[k] for k in ks],
                          "status": ["ok"] * len(ks), "itm_syn": [0.5] * len(ks)})
        pq.write_table(table, out / f"{shard}.parquet")
    (out / "stats.json").write_text("{}")  # other files in the folder are ignored
    m = evaluate_filter(out, web, threshold=0.5)
    n_noisy, n_clean = len(noisy), len(clean)
    tp, fp = n_noisy - 3, 2
    assert (m["n"], m["n_noisy"], m["n_missing"], m["n_dropped"]) == (120, n_noisy, 0, tp + fp)
    assert m["precision"] == tp / (tp + fp) and m["recall"] == tp / n_noisy
    assert m["clean_drop_rate"] == 2 / n_clean
    # noisy p: 0.2 (n-3 of them), 0.9 (3); clean p: 0.8 (c-2), 0.1 (2)
    wins = (n_noisy - 3) * (n_clean - 2) + 3 * 0 + 0 * 2
    assert m["auc"] == pytest.approx(wins / (n_noisy * n_clean))
    kinds = {labels[k] for k in noisy}
    assert set(m["per_kind"]) == kinds
    for kind in kinds:
        members = [k for k in noisy if labels[k] == kind]
        assert {k: m["per_kind"][kind][k] for k in ("count", "recall")} == {
            "count": len(members), "recall": sum(k not in missed for k in members) / len(members)}
    b = m["itc_baseline"]  # drops the tp + fp lowest cosines: the 3 missed (-0.9) and 2 false drops come first
    assert b["n_dropped"] == tp + fp and b["recall"] == (3 + tp + fp - 5) / n_noisy
    # the same scores from a table in memory and from a mapping
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])
    assert load_filter_scores(table) == load_filter_scores(out)
    assert evaluate_filter(itm, web)["auc"] == m["auc"] and "itc_baseline" not in evaluate_filter(itm, web)


def test_score_tables_with_problems_are_named(tmp_path):
    with pytest.raises(KeyError, match="itm_web"):
        load_filter_scores(pa.table({"key": ["a"], "p": [0.1]}))
    with pytest.raises(ValueError, match="repeated keys"):
        load_filter_scores(pa.table({"key": ["a", "a"], "itm_web": [0.1, 0.2]}))
    with pytest.raises(FileNotFoundError, match="parquet"):
        load_filter_scores(str(tmp_path))
    itm, itc = load_filter_scores(pa.table({"key": ["a", "b"], "itm_web": [0.1, None]}))
    assert itc is None and itm["a"] == 0.1 and math.isnan(itm["b"])
    assert os.path.isdir(tmp_path)
