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


def test_a_splits_skipped_metrics_are_notes_not_a_row_of_reasons():
    """Evaluation writes ``test/skipped``; its reasons go under the table once, so no table line
    repeats a long reason per column (a DVC log keeps report lines under 300 characters)."""
    why = "needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads on first use; " * 2
    runs = {"baseline": {"test/CIDEr": 1.7, "test/skipped": {"SPICE": why}},
            "capfilt": {"test/CIDEr": 1.8, "test/skipped": {"SPICE": why}}}
    got = metrics_table(runs)
    assert got.splitlines()[2:] == ["| test/CIDEr | 1.70 | 1.80 |", "", f"- test/SPICE skipped (baseline, capfilt): {why}"]
    assert "test/skipped" not in flatten(runs["baseline"])


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


def _ranks_file(path, txt_ranks, image_ids=None):
    import json

    txt = np.asarray(txt_ranks)
    split = {"txt_ranks": txt.tolist(), "img_ranks": np.repeat(txt, 5).tolist(),
             "txt2img": np.repeat(np.arange(len(txt)), 5).tolist(), "image_ids": image_ids or list(range(len(txt)))}
    path.write_text(json.dumps({"test": split, "zeroshot": split}))
    return path


def test_report_shows_the_paired_interval_and_the_detectable_effect_and_refuses_other_queries(tmp_path):
    import json

    from blip import params as params_module
    from blip.stages.common import StageError
    from blip.stages.evaluate import report
    from blip.track import NullTracker

    rng = np.random.default_rng(0)
    base = rng.integers(0, 20, size=300)
    new = np.where(rng.random(300) < 0.3, 0, base)  # better on ~30% of the images
    b = _ranks_file(tmp_path / "baseline_ranks.json", base)
    c = _ranks_file(tmp_path / "capfilt_ranks.json", new)
    for name in ("baseline", "capfilt"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"test/r_mean": 40.0}))
    params = params_module.from_dict({"capfilt": {"filter_score": "oracle"}})
    args = dict(metrics=[f"baseline={tmp_path / 'baseline.json'}", f"capfilt={tmp_path / 'capfilt.json'}"],
                out=str(tmp_path / "report.md"), json_out=str(tmp_path / "report.json"))
    report(None, params, NullTracker(), ranks=[f"capfilt={c}", f"baseline={b}"], **args)
    md = (tmp_path / "report.md").read_text()
    iv = json.loads((tmp_path / "report.json").read_text())["intervals"]
    t = iv["test"]
    assert iv["difference"] == "capfilt − baseline" and t["diff"] > 0 and t["lo"] < t["diff"] < t["hi"]
    line = (f"- **test**: capfilt − baseline r_mean = **{t['diff']:+.2f}** [{t['lo']:+.2f}, {t['hi']:+.2f}] "
            f"(95% paired bootstrap over 300 test images, 2000 draws); smallest detectable effect "
            f"±{t['detectable_effect']:.2f}")
    assert line in md and "- **zeroshot**:" in md
    assert t["detectable_effect"] == pytest.approx((t["hi"] - t["lo"]) / 2)
    assert "an evaluation instrument, not a filter" in md  # the oracle says what it is
    other = _ranks_file(tmp_path / "other_ranks.json", new, image_ids=list(range(1, 301)))
    with pytest.raises(StageError, match=r"other_ranks.json and .*baseline_ranks.json do not rank the same test"):
        report(None, params, NullTracker(), ranks=[f"baseline={b}", f"capfilt={other}"], **args)
    with pytest.raises(StageError, match="exactly two"):
        report(None, params, NullTracker(), ranks=[f"baseline={b}"], **args)


def test_dataset_table_shows_the_true_synthetic_noise_ratio_beside_table_2s():
    """Table 2's "noise ratio" is what the filter rejects; the caption checker's true ratio sits beside it."""
    from blip.evaluate.report import dataset_table

    ds = {"use_filter": True, "noise_ratio": 0.044, "web_drop_ratio": 0.27, "sources": {}}
    assert "the share the filter rejects): 0.044; true noise ratio (caption checker): 0.744" in dataset_table(ds, 0.744)
    assert "true noise ratio" not in dataset_table(ds)  # real data: no scenes to check against
