"""The side-by-side markdown table the pipeline's report stage prints."""

from __future__ import annotations

import numpy as np
import pytest

from blip.evaluate.report import flatten, metrics_table


def test_table_side_by_side_with_delta_and_notes():
    baseline = {"r_mean": 40.0, "Bleu_4": 0.1234, "n_images": 250, "tokenizer": "PTBTokenizer",
                "skipped": {"SPICE": "offline", "METEOR": "no java"}}
    capfilt = {"r_mean": np.float64(45.5), "Bleu_4": float("nan"), "n_images": np.int64(250), "CIDEr": 1.0,
               "tokenizer": "PTBTokenizer", "skipped": {"SPICE": "offline"}}
    got = metrics_table({"baseline": baseline, "CapFilt": capfilt}, delta=True)
    assert got == (
        "| metric | baseline | CapFilt | Δ |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| r_mean | 40.00 | 45.50 | 5.50 |\n"
        "| Bleu_4 | 0.12 | nan | nan |\n"
        "| n_images | 250 | 250 | 0 |\n"
        "| tokenizer | PTBTokenizer | PTBTokenizer | – |\n"
        "| CIDEr | – | 1.00 | – |\n"
        "\n"
        "- SPICE skipped (baseline, CapFilt): offline\n"
        "- METEOR skipped (baseline): no java\n"
    )


def test_rows_digits_nesting_and_escaping():
    m = {"auc": 0.91234, "per_kind": {"spam": {"recall": 1.0, "count": 3}}, "note": "a|b", "ok": True}
    assert flatten(m) == {"auc": 0.91234, "per_kind.spam.recall": 1.0, "per_kind.spam.count": 3, "note": "a|b",
                          "ok": True}
    got = metrics_table({"ITM": m, "ITC": {"auc": 0.5}}, rows=["per_kind.spam.recall", "auc", "note", "ok"], digits=3)
    assert got.splitlines()[2:] == ["| per_kind.spam.recall | 1.000 | – |", "| auc | 0.912 | 0.500 |",
                                    "| note | a\\|b | – |", "| ok | true | – |"]
    with pytest.raises(ValueError, match="two columns"):
        metrics_table({"a": m}, delta=True)
    with pytest.raises(ValueError, match="no metric"):
        metrics_table({})


def test_dataset_table_says_when_the_filter_only_measured():
    """``web_drop_ratio`` is what the filter rejects; with the filter off nothing was dropped."""
    from blip.evaluate.report import dataset_table

    web = {"input": 10, "kept": 10, "dropped": 0, "dropped_by": {}}
    off = dataset_table({"use_filter": False, "web_drop_ratio": 0.4, "sources": {"web": web}})
    assert "| web |  | 10 | 10 | 0 | – |" in off and "0.400 (not dropped: the filter is off" in off
    on = dataset_table({"use_filter": True, "web_drop_ratio": 0.4, "sources": {}})
    assert "web texts the filter rejects: 0.400\n" in on
