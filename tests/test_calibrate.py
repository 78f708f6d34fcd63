"""``python -m blip calibrate``: the metrics against hand-computed values, the label join and its
errors, and the outcome that matters — on a generated world's labelled sample, the chosen cut's
precision on ALL the hidden labels is the target's, within 0.05."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_capfilt import world_fixture  # noqa: F401
from PIL import Image

from blip.capfilt.filter import SCHEMA
from blip.capfilt.reader import SampleStream
from blip.cli import main as cli
from blip.data.generator import GenerateConfig, generate
from blip.data.labels import noise_labels
from blip.data.shards import resolve_shards
from blip.evaluate.calibration import (
    at_threshold,
    average_precision,
    calibrate,
    parse_label,
    pr_curve,
    read_labels,
    roc_curve,
    threshold_for_fraction,
    threshold_for_precision,
    wilson_interval,
)
from blip.evaluate.filter_quality import roc_auc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# thresholds descending: 0.9 keeps 1 (good), 0.8 keeps 2 (1 good), 0.7: 3 (2), 0.6: 4 (3), 0.5: 5 (3)
S, Y = [0.6, 0.9, 0.5, 0.8, 0.7], [1, 1, 0, 0, 1]


def test_curves_and_average_precision_have_the_hand_computed_values():
    p, r, t = pr_curve(S, Y)
    assert t.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert p == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
    assert r == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1, 1])
    assert average_precision(S, Y) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)  # 29/36: P at each recall step
    fpr, tpr, rt = roc_curve(S, Y)
    assert fpr == pytest.approx([0, 0, 1 / 2, 1 / 2, 1 / 2, 1]) and tpr == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    assert rt[0] == math.inf and roc_auc(S, Y) == pytest.approx(4 / 6)  # 4 of 6 (good, bad) pairs ordered
    # ties: one point per distinct score; the trapezoid under the ROC is the rank AUC (ties one half)
    p, r, t = pr_curve([0.5, 0.5, 0.2], [1, 0, 1])
    assert t.tolist() == [0.5, 0.2] and p == pytest.approx([1 / 2, 2 / 3]) and r == pytest.approx([1 / 2, 1])
    rng = np.random.default_rng(0)
    for _ in range(5):
        s, y = rng.integers(0, 6, 50) / 5, rng.random(50) < 0.5
        fpr, tpr, _ = roc_curve(s, y)
        assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(s, y), abs=1e-12)
        order = np.argsort(-s, kind="stable")  # AP by its definition: mean precision at each good text's rank
        hits = np.cumsum(y[order])
        ranks_end = {v: np.flatnonzero(s[order] == v).max() for v in np.unique(s)}
        ap = np.mean([hits[ranks_end[v]] / (ranks_end[v] + 1) for v in s[order][y[order]]])
        assert average_precision(s, y) == pytest.approx(ap)
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_the_chosen_cut_is_the_lowest_reaching_the_target():
    assert threshold_for_precision(S, Y, 0.7) == 0.6  # 0.9 (P 1) and 0.6 (P 0.75) reach it: the lower, recall 1
    assert threshold_for_precision(S, Y, 0.8) == 0.9
    assert threshold_for_precision(S, Y, 0.6) == 0.5
    assert threshold_for_precision(S, Y, 1.0) == 0.9
    assert threshold_for_precision([0.9, 0.8], [0, 1], 0.9) is None
    m = at_threshold(S, Y, 0.6)
    assert (m["precision"], m["recall"], m["fpr"], m["n_kept_labelled"]) == (0.75, 1.0, 0.5, 4)
    lo, hi = m["precision_ci95"]
    assert 0.3 < lo < 0.75 < hi < 1  # Wilson interval of 3 of 4
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(10, 10)[1] == pytest.approx(1)
    pop = np.arange(1, 11) / 10
    assert threshold_for_fraction(pop, 0.3) == 0.8  # keeps 0.8, 0.9, 1.0
    assert threshold_for_fraction(pop, 1.0) == 0.1 and threshold_for_fraction(pop, 0.01) == 1.0
    assert threshold_for_fraction([0.5, 0.5, 0.5, 0.1], 0.25) == 0.5  # ties at the cut are all kept
    with pytest.raises(ValueError, match="keep fraction"):
        threshold_for_fraction(pop, 0)


def test_label_spellings():
    assert [parse_label(v) for v in ("good", "GOOD ", "1", "match", "bad", "0", "nomatch", "no-match", "No Match")] \
        == [True, True, True, True, False, False, False, False, False]
    assert parse_label("maybe") is None


def _write_table(path, rows):
    cols = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    pq.write_table(pa.table(cols, schema=SCHEMA), path)


def _write_labels(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "text", "label"])
        w.writerows(rows)


@pytest.fixture(name="hand_tables")
def hand_tables_fixture(tmp_path):
    """Two shards' score tables: four usable samples with a web and a synthetic text each, one
    sample the loader skipped."""
    scores = tmp_path / "scores"
    scores.mkdir()
    _write_table(scores / "00000.parquet", [
        {"key": "000000000", "web_text": "a red cube", "syn_text": "a red cube on grass", "itm_web": 0.9,
         "itm_syn": 0.8, "itc_web": 0.4, "itc_syn": 0.35, "status": "ok"},
        {"key": "000000001", "web_text": "buy cheap watches", "syn_text": "two blue balls", "itm_web": 0.1,
         "itm_syn": 0.7, "itc_web": 0.05, "itc_syn": 0.3, "status": "ok"},
        {"key": "000000002", "status": "undecodable_image"},
    ])
    _write_table(scores / "00001.parquet", [
        {"key": "000010000", "web_text": "img_0042 jpg", "syn_text": "a green cone", "itm_web": 0.3,
         "itm_syn": 0.6, "itc_web": 0.1, "itc_syn": 0.3, "status": "ok"},
        {"key": "000010001", "web_text": "three yellow cubes", "syn_text": None, "itm_web": 0.6,
         "itm_syn": None, "itc_web": 0.25, "itc_syn": None, "status": "ok"},
    ])
    return scores


def test_labels_join_by_key_and_text_and_unmatched_rows_are_named(hand_tables, tmp_path):
    labels = tmp_path / "labels.csv"
    _write_labels(labels, [
        ("000000000", "A red cube.", "good"),  # the raw caption: matched once cleaned as the loader cleans it
        ("000000001", "two blue balls", "1"),  # the synthetic caption: its synthetic score
        ("000000001", "buy cheap watches", "bad"),
        ("000010000", "img_0042 jpg", "nomatch"),
        ("000010001", "three yellow cubes", "match"),
    ])
    cal = calibrate(hand_tables, labels, target_precision=0.8)
    r = cal.report
    assert (r["n_matched"], r["n_matched_web"], r["n_matched_syn"], r["n_unmatched"]) == (5, 4, 1, 0)
    s, y = cal.labelled["itm"]
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.1, 0.3, 0.6]) and y.tolist() == [1, 1, 0, 0, 1]
    itm = r["scores"]["itm"]
    assert itm["chosen"]["threshold"] == pytest.approx(0.6) and itm["chosen"]["recall"] == 1.0
    assert itm["roc_auc"] == 1.0 and itm["n_scored"] == {"web": 4, "syn": 3}
    # kept fraction over ALL scored texts (7: 4 web + 3 synthetic), not only the labelled ones
    assert itm["chosen"]["kept_fraction"] == pytest.approx(5 / 7) and itm["chosen"]["kept_fraction_web"] == 0.5
    assert itm["blip_default"]["threshold"] == 0.5 and itm["blip_default"]["precision"] == 1.0
    assert calibrate(hand_tables, labels, keep_fraction=3 / 7).report["scores"]["itm"]["chosen"]["threshold"] \
        == pytest.approx(0.7)
    both = calibrate(hand_tables, labels, score="both").report["scores"]
    assert set(both) == {"itm", "itc"} and "blip_default" not in both["itc"]

    _write_labels(labels, [
        ("000000000", "a red cube", "good"),
        ("000000001", "buy cheap watches", "bad"),
        ("000000001", "a caption nobody scored", "good"),  # line 4
        ("999999999", "a red cube", "bad"),  # line 5
        ("000000002", "a red cube", "bad"),  # line 6: the loader skipped it
    ])
    with pytest.raises(ValueError) as e:
        calibrate(hand_tables, labels)
    msg = str(e.value)
    assert "3 of 5 labelled rows" in msg and "line 4: key '000000001'" in msg and "web_text 'buy cheap watches'" in msg
    assert "line 5: key '999999999'" in msg and "in no score table" in msg
    assert "line 6" in msg and "undecodable_image" in msg and "--allow-unmatched" in msg
    cal = calibrate(hand_tables, labels, allow_unmatched=True)
    assert (cal.report["n_matched"], cal.report["n_unmatched"], cal.report["unmatched_lines"]) == (2, 3, [4, 5, 6])
    # through the command: the same message, exit status 2
    with pytest.raises(SystemExit) as e:
        cli(["calibrate", "--scores", str(hand_tables), "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert e.value.code == 2

    _write_labels(labels, [("000000000", "a red cube", "perhaps")])
    with pytest.raises(ValueError, match="line 2: label 'perhaps'"):
        read_labels(labels)
    _write_labels(labels, [("000000000", "a red cube", "good"), ("000010001", "three yellow cubes", "good")])
    with pytest.raises(ValueError, match="both good and bad"):
        calibrate(hand_tables, labels)


# A stand-in filter for the generated world: ITM p(match) = sigmoid(mean + N(0, 1)), the mean by
# what the pair is. A random-init model scores at chance, and training one is minutes, so the
# world, its hidden labels, the reader, the sample and the command are real and the scores are not.
LOGIT_MEAN = {None: 1.5, "unrelated": -2.5, "spam": -2.5, "generic": -2.0, "filename": -2.0,
              "wrong_attribute": 0.0, "wrong_count": 0.3}


def _simulated_scores(web, out, seed: int = 0):
    truth = noise_labels(web)  # only to simulate the scorer; the command reads labels.csv
    rng = np.random.default_rng(seed)
    out.mkdir()
    for url in resolve_shards(web):
        rows = []
        for v in SampleStream(url):  # the filter stage's reader: its keys, statuses and cleaned texts
            row = {"key": v.key, "status": v.status}
            if v.sample is not None:
                logit = LOGIT_MEAN[truth[v.key]] + rng.normal()
                row |= {"web_text": v.sample.captions[0], "itm_web": 1 / (1 + math.exp(-logit)),
                        "itm_logit_web": logit, "itc_web": 0.1 * logit + 0.05 * rng.normal()}
            rows.append(row)
        _write_table(out / f"{url.rsplit('/', 1)[-1].split('.')[0]}.parquet", rows)


def test_calibrated_threshold_has_the_target_precision_on_the_hidden_labels(tmp_path, capsys):
    root = tmp_path / "gen"
    generate(GenerateConfig(seed=5, web=600, human=0, val=0, test=0, zeroshot=0, shard_size=200), str(root),
             splits=("web",), processes=1, progress=False)
    web, scores = root / "web", tmp_path / "scores"
    _simulated_scores(web, scores)
    labels = tmp_path / "labels.csv"
    assert cli(["calibrate", "sample", "--web", str(web), "--scores", str(scores), "--n", "300", "--seed", "0",
                "--out", str(labels)]) == 0
    rows = read_labels(labels)
    truth = noise_labels(web)
    assert len(rows) == 300 and len({r.key for r in rows}) == 300
    assert all(r.good == (truth[r.key] is None) for r in rows)
    base = np.mean([r.good for r in rows])
    assert 0.45 < base < 0.75  # the generator's 40% noise, give or take
    target = round((base + 1) / 2, 2)  # midway between keeping everything and perfect precision
    out = tmp_path / "cal"
    assert cli(["calibrate", "--scores", str(scores), "--labels", str(labels), "--target-precision", str(target),
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"precision >= {target}: threshold" in printed and "to use it: assemble.threshold:" in printed
    report = json.loads((out / "calibration.json").read_text())
    chosen = report["scores"]["itm"]["chosen"]
    assert chosen["threshold"] is not None and chosen["precision"] >= target
    # the outcome: over ALL web texts, the cut keeps texts that are `target` clean, within 0.05
    table = pa.concat_tables([pq.read_table(p) for p in sorted(scores.glob("*.parquet"))]).to_pylist()
    kept = [truth[r["key"]] is None for r in table if r["status"] == "ok" and r["itm_web"] >= chosen["threshold"]]
    assert abs(np.mean(kept) - target) <= 0.05, (np.mean(kept), target, chosen)
    assert chosen["kept_fraction"] == pytest.approx(len(kept) / sum(r["status"] == "ok" for r in table))
    assert 0 < chosen["recall"] < 1 and report["scores"]["itm"]["roc_auc"] > 0.8
    png = (out / "calibration.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    with Image.open(out / "calibration.png") as im:
        im.verify()


def test_end_to_end_on_the_filter_stage_tables(world, tmp_path, capsys):
    """The filter stage's own tables (tiny random-init filter, with synthetic captions):
    the sample, a synthetic text in the labels, ``--score both``, ``--keep-fraction``."""
    labels = tmp_path / "labels.csv"
    assert cli(["calibrate", "sample", "--web", str(world.web), "--scores", str(world.scores), "--n", "40",
                "--out", str(labels)]) == 0
    tables = pa.concat_tables([pq.read_table(p) for p in sorted(world.scores.glob("*.parquet"))]).to_pylist()
    syn = next(r for r in tables if r["syn_text"] and r["syn_text"] != r["web_text"])
    with open(labels, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([syn["key"], syn["syn_text"], "good"])
    out = tmp_path / "cal"
    assert cli(["calibrate", "--scores", str(world.scores), "--labels", str(labels), "--keep-fraction", "0.5",
                "--score", "both", "--out", str(out)]) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert (report["n_matched"], report["n_matched_syn"], report["n_unmatched"]) == (41, 1, 0)
    n_texts = sum(bool(r["web_text"]) + bool(r["syn_text"]) for r in tables if r["status"] == "ok")
    for name in ("itm", "itc"):
        m = report["scores"][name]
        assert m["n_scored"]["web"] + m["n_scored"]["syn"] == n_texts
        assert m["chosen"]["rule"] == "keep_fraction" and abs(m["chosen"]["kept_fraction"] - 0.5) <= 1 / n_texts
        assert len(m["pr_curve"]["threshold"]) == len(m["pr_curve"]["precision"]) <= 41
    assert "itm: ROC-AUC" in capsys.readouterr().out
    with Image.open(out / "calibration.png") as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] / 2  # two rows of panels
