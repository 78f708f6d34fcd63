"""The CapFilt picture (web and synthetic texts, kept and dropped) and the report that shows it."""

from __future__ import annotations

import base64
import json

import pytest
from fixtures_capfilt import world_fixture  # noqa: F401
from PIL import Image

from blip.data.labels import noise_labels
from blip.evaluate.gallery import _score_rows, capfilt_gallery, pick
from blip.evaluate.report import dataset_table, filter_by_kind, headline


def test_pick_takes_each_kind_in_key_order():
    rows = {k: {"status": "ok", "itm_web": 0.5} for k in ("a", "b", "c", "d", "e")}
    rows["f"] = {"status": "undecodable_image", "itm_web": None}
    labels = {"a": None, "b": "spam", "c": None, "d": "spam", "e": "wrong_count", "f": None}
    got = pick(rows, labels, per_kind=1)
    assert got == ["a", "e", "b"]  # clean, then NOISE_KINDS order (wrong_count before spam); f unusable
    assert pick(rows, labels, per_kind=5) == ["a", "c", "e", "b", "d"]


def test_gallery_draws_every_kind_it_finds(world, tmp_path):
    labels = noise_labels(world.web)
    rows = _score_rows(world.scores)
    out = tmp_path / "gallery.png"
    result = capfilt_gallery(world.web, world.scores, str(out), threshold=0.5, per_kind=2, cols=4, cell=96)
    present = {labels[k] or "clean" for k, r in rows.items() if r["status"] == "ok"}
    assert set(result["kinds"]) == present and all(1 <= n <= 2 for n in result["kinds"].values())
    img = Image.open(out)
    n = result["samples"]
    assert img.width == 4 * 96 and img.height > ((n + 3) // 4) * 96
    # red and green text are both drawn when the threshold splits the scores
    colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (210, 30, 30) in colours or (40, 150, 60) in colours


def test_report_sections_lead_with_the_answer():
    runs = {"baseline": {"test/r_mean": 10.0, "zeroshot/r_mean": 8.0, "test/CIDEr": 0.5,
                         "skipped": {"SPICE": "offline"}},
            "capfilt": {"test/r_mean": 14.5, "zeroshot/r_mean": 9.0, "test/CIDEr": 0.4}}
    md = headline(runs)
    assert md.startswith("The model pre-trained on the bootstrapped data is **better**")
    assert "r_mean 14.5 vs 10.0 (Δ +4.5" in md and "| test/CIDEr | 0.50 | 0.40 | -0.10 |" in md
    assert "SPICE" not in md  # notes belong to the details table
    fq = {"auc": 0.9, "threshold": 0.5, "n": 10, "n_noisy": 4, "n_dropped": 4, "precision": 0.75, "recall": 0.75,
          "clean_drop_rate": 1 / 6, "per_kind": {"spam": {"count": 2, "recall": 1.0, "auc": 0.95},
                                                 "wrong_count": {"count": 2, "recall": 0.5, "auc": 0.61}},
          "itc_baseline": {"auc": 0.7, "clean_drop_rate": 0.5, "per_kind": {"spam": {"recall": 0.5, "auc": 0.8}}}}
    table = filter_by_kind(fq)
    assert "ITM **0.900**, ITC cosine 0.700" in table
    assert "| spam | 2 | 1.00 | 0.50 | 0.950 / 0.800 |" in table and "| wrong_count | 2 | 0.50 | – | 0.610 / – |" in table
    assert "| clean | 6 | 0.17 | 0.50 | |" in table
    ds = {"units": {"web": "texts"}, "sources": {"web": {"input": 10, "kept": 7, "dropped": 3,
                                                         "dropped_by": {"filter": 3}}},
          "noise_ratio": 0.2, "web_drop_ratio": 0.3, "texts": {"total": 7}, "images": 10, "shards": 1}
    assert "| web | texts | 10 | 7 | 3 | filter 3 |" in dataset_table(ds)


def test_flow_inlines_the_gallery_for_the_prefect_ui(tmp_path):
    pytest.importorskip("prefect")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
    from bootstrap import inline_images

    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "g.png")
    md = inline_images("text\n![CapFilt](g.png)\n![gone](missing.png)\n", tmp_path)
    uri = md.split("](data:image/png;base64,")[1].split(")")[0]
    assert Image.open(__import__("io").BytesIO(base64.b64decode(uri))).size == (4, 4)
    assert "![gone](missing.png)" in md
    assert json.dumps(md)  # a string Prefect can store
