"""Caption metrics: equal to pycocoevalcap's own scorers, skips named; the evaluation loop keys
predictions by the ground truth's image ids."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fixtures_data import small_world_fixture  # noqa: F401

from blip.data.corpus import caption_corpus
from blip.data.layout import gt_path
from blip.data.loader import make_loader
from blip.evaluate.captioning import (
    caption_metrics,
    evaluate_captioning,
    java_available,
    load_gts,
    simple_tokenize,
)
from blip.model.blip import BlipCaptioner
from blip.model.config import GenerationConfig, load_preset
from blip.tokenizer import build_tokenizer

JAVA = java_available()
needs_java = pytest.mark.skipif(not JAVA, reason="java does not run here (PTBTokenizer and METEOR need it)")

GTS = {
    11: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave!", "Man surfing, in the ocean."],
    22: ["Two dogs play with a red ball in the grass.", "A pair of dogs chasing a ball", "dogs playing outside"],
    33: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
         "A healthy meal on a plate"],
    44: ["A red double-decker bus on a city street.", "The bus is driving down the road."],
}
RES = {11: "a man riding a wave on a surfboard", 22: "two dogs playing with a ball in the grass",
       33: "a plate of rice and broccoli", 44: "a red bus driving down a street"}


def reference_scores(gts, res, meteor: bool):
    """pycocoevalcap run by hand, as environment.md §9 and COCOEvalCap.evaluate do."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    g = tok.tokenize({i: [{"caption": c} for c in caps] for i, caps in gts.items()})
    r = tok.tokenize({i: [{"caption": res[i]}] for i in gts})
    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(g, r, verbose=0)[0]))
    if meteor:
        out["METEOR"] = Meteor().compute_score(g, r)[0]
    out["ROUGE_L"] = Rouge().compute_score(g, r)[0]
    out["CIDEr"] = Cider().compute_score(g, r)[0]
    return out


@needs_java
def test_caption_metrics_equal_pycocoevalcap_scorers(caplog):
    expected = reference_scores(GTS, RES, meteor=True)
    with caplog.at_level(logging.WARNING, logger="blip.evaluate"):
        got = caption_metrics(GTS, RES, meteor="auto")
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert 0 < got["Bleu_4"] < got["Bleu_1"] < 1 and got["CIDEr"] > 0 and 0 < got["METEOR"] < 1
    assert got["tokenizer"] == "PTBTokenizer" and got["n_images"] == 4
    assert set(got["skipped"]) == {"SPICE"} and "offline" in got["skipped"]["SPICE"]
    assert "SPICE" in caplog.text  # logged, not only returned


def test_skipped_metrics_are_named_and_the_rest_is_scored():
    got = caption_metrics(GTS, RES, meteor=False)
    assert "METEOR" not in got and "SPICE" not in got
    assert set(got["skipped"]) == {"SPICE", "METEOR"} and "meteor=False" in got["skipped"]["METEOR"]
    assert {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(got)
    if JAVA:  # without Java this run used the fallback tokenizer, so there is no reference to match
        ref = reference_scores(GTS, RES, meteor=False)
        assert {k: got[k] for k in ref} == pytest.approx(ref)
    # a subset of images is scored on its own (the IDF of CIDEr comes from those references)
    sub = caption_metrics(GTS, {11: RES[11], 22: RES[22]}, meteor=False)
    assert sub["n_images"] == 2 and sub["Bleu_1"] != got["Bleu_1"]


def test_predictions_for_unknown_images_are_an_error():
    with pytest.raises(ValueError, match="same image ids"):
        caption_metrics(GTS, {**RES, 99: "a cat"}, meteor=False)
    with pytest.raises(ValueError, match="meteor"):
        caption_metrics(GTS, RES, meteor="yes")


@needs_java
def test_simple_tokenizer_matches_ptb_on_plain_captions(small_world):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = load_gts(gt_path(str(small_world), "val"))
    gts[-1] = [c for caps in GTS.values() for c in caps]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in gts.items()})
    assert simple_tokenize(gts) == ptb


@pytest.fixture(scope="module")
def captioner(small_world):
    tok = build_tokenizer(caption_corpus(small_world / "human"), vocab_size=300)
    cfg = load_preset("tiny", vision={"depth": 2}, text={**tok.special_ids, "num_hidden_layers": 2})
    torch.manual_seed(0)
    return BlipCaptioner(cfg), tok


def test_evaluate_captioning_scores_beam_captions_by_gt_image_id(captioner, small_world):
    model, tok = captioner
    gt_file = gt_path(str(small_world), "val")
    with open(gt_file, encoding="utf-8") as f:
        gt = json.load(f)
    metrics, preds = evaluate_captioning(model, tok, small_world / "val", gt_file, batch_size=5, meteor=False)
    assert [p["image_id"] for p in preds] == [im["id"] for im in gt["images"]]  # every GT image, loader order
    # default decoding is BLIP's: beam search, 3 beams, max 20 / min 5 tokens with the prompt
    batch = next(iter(make_loader(small_world / "val", batch_size=12, image_size=64, train=False)))
    model.eval()
    beam = model.caption(batch["image"], tok, GenerationConfig(method="beam", num_beams=3, max_length=20, min_length=5))
    assert [p["caption"] for p in preds] == beam
    gts = {a["image_id"]: [] for a in gt["annotations"]}
    for a in gt["annotations"]:
        gts[a["image_id"]].append(a["caption"])
    assert load_gts(gt_file) == gts
    expected = caption_metrics(gts, {p["image_id"]: p["caption"] for p in preds}, meteor=False)
    assert metrics == expected and metrics["n_images"] == 12
