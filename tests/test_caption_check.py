"""The caption checker (``blip.evaluate.caption_check``): every caption the grammar writes is true
of its scene, the generator's corrupted captions are false (of the right kind), model-like errors
get their label, web scenes are regenerated exactly, and ``check_synthetic`` counts exactly."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_data import image_bytes, sample, write_raw_tar

from blip import params as params_module
from blip.data.generator import GenerateConfig, generate, make_sample
from blip.data.grammar import SIZE_WORDS, describe, web_style
from blip.data.labels import noise_labels
from blip.data.noise import perturb_count
from blip.data.text import pre_caption
from blip.data.world import TRAIN_BACKGROUNDS, ZEROSHOT_BACKGROUNDS, Group, Scene, WorldConfig, sample_scene
from blip.evaluate.caption_check import (
    CHECK_LABELS,
    CaptionGroup,
    NotGeneratedWorld,
    ParsedCaption,
    check_caption,
    check_synthetic,
    generator_config,
    objects_right,
    parse_caption,
    scene_of_web,
)
from blip.evaluate.report import synthetic_check_table
from blip.track import NullTracker

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTE_LABELS = {"wrong_shape", "wrong_colour", "wrong_size", "wrong_position", "wrong_relation"}


# ---- (a) the grammar's own captions are true ----------------------------------------------------


def test_every_caption_the_grammar_writes_parses_and_is_true_of_its_scene():
    rng = np.random.default_rng(0)
    world = WorldConfig(n_shapes=8, n_colours=12)  # every shape and colour word there is
    forms = set()
    for i in range(2000):
        scene = sample_scene(rng, world, ZEROSHOT_BACKGROUNDS if i % 4 == 0 else TRAIN_BACKGROUNDS)
        for _ in range(2):
            text = describe(scene, rng)
            web = web_style(text, rng)
            for form in (text, web, pre_caption(web), text + ".", "  " + text.replace(" ", "   ") + " "):
                label, detail = check_caption(form, scene)
                assert label == "correct", (form, scene, detail)
                assert objects_right(form, scene)
            p = parse_caption(text)
            forms.add((len(p.groups), p.position is not None, p.background is not None, text.split()[0]))
    # both group counts, said and unsaid position and background, and several sentence frames were seen
    assert {(n, bg) for n, _, bg, _ in forms} == {(1, False), (1, True), (2, False), (2, True)}
    assert {pos for n, pos, _, _ in forms if n == 1} == {False, True}
    assert {"there", "a", "an", "two", "three", "in", "at"} <= {w for *_, w in forms}


def test_parse_normalises_synonyms_decorations_and_backward_relations():
    assert parse_caption("Two Gray Discs Below A Violet Plus Sign - Stock Image") == ParsedCaption(
        (CaptionGroup(1, None, "purple", "cross"), CaptionGroup(2, None, "grey", "circle")), relation="above")
    assert parse_caption("a pair of medium - sized red blocks and an orange star , the star on the right of the "
                         "blocks over a grid") == ParsedCaption(
        (CaptionGroup(2, "medium", "red", "square"), CaptionGroup(1, None, "orange", "star")), relation="left_of",
        background="grid")
    assert parse_caption("stock photo in the top left corner, a single tiny green triangle ( hd )") == ParsedCaption(
        (CaptionGroup(1, "small", "green", "triangle"),), position="top left")
    assert parse_caption("photo of there are three big rhombuses at the upper right") is None  # no colour
    assert parse_caption("a red circle on the left") == ParsedCaption((CaptionGroup(1, None, "red", "circle"),), "left")


# ---- (b) the generator's noise captions are false -------------------------------------------------

NOISE_CFG = GenerateConfig(seed=1, web=300, world=WorldConfig(image_size=16, supersample=1))  # scenes as at 64 px


def _noisy(kind: str, n: int = 300):
    for i in range(n):
        _, [text], _ = make_sample(NOISE_CFG, "web", i, kind)
        yield i, text, check_caption(text, scene_of_web(i, NOISE_CFG))[0]


def _size_word_dropped(noisy: str, clean: str) -> bool:
    """The perturbed size made ``describe`` leave the size out (its say-size draw depends on the
    size): the "wrong" caption is then a true one with one word fewer."""
    n, c = noisy.lower().split(), clean.lower().split()
    sizes = {w for words in SIZE_WORDS.values() for w in words}
    return len(c) == len(n) + 1 and any(c[j] in sizes and c[:j] + c[j + 1:] == n for j in range(len(c)))


def test_wrong_count_captions_are_wrong_count():
    assert {label for _, _, label in _noisy("wrong_count")} == {"wrong_count"}


def test_wrong_attribute_captions_are_a_wrong_attribute_unless_the_size_word_was_dropped():
    labels = []
    for i, text, label in _noisy("wrong_attribute"):
        if label == "correct":  # the generator's quirk: a true caption labelled noise
            _, [clean], _ = make_sample(NOISE_CFG, "web", i, None)
            assert _size_word_dropped(text, clean), (text, clean)
        labels.append(label)
    assert set(labels) - {"correct"} == ATTRIBUTE_LABELS  # every kind of attribute is perturbed and found
    assert labels.count("correct") < 0.05 * len(labels)


def test_unrelated_captions_are_wrong_and_junk_is_unparseable():
    unrelated = [label for _, _, label in _noisy("unrelated")]
    assert sum(label != "correct" for label in unrelated) >= 0.95 * len(unrelated)
    for kind in ("generic", "filename", "spam"):
        assert {label for _, _, label in _noisy(kind, 100)} == {"unparseable"}, kind
    assert {label for _, _, label in _noisy(None, 100)} == {"correct"}


# ---- (c) model-like errors ------------------------------------------------------------------------

ONE = Scene((Group("circle", "red", "medium", 1),), "center", "plain")
PAIR = Scene((Group("circle", "red", "small", 1), Group("square", "blue", "large", 2)), "left_of", "striped")


@pytest.mark.parametrize("text, scene, label", [
    ("two red circles", ONE, "wrong_count"),
    ("two red circles in the middle", ONE, "wrong_count"),
    ("A red circle in the middle .", ONE, "correct"),
    ("a orange circle", Scene((Group("circle", "orange", "small", 1),), "left", "plain"), "correct"),  # a/an
    ("there are a red circle", ONE, "correct"),  # is/are: agreement, not a claim
    ("a blue star on the left", ONE, "wrong_shape"),  # shape first, though colour and position are wrong too
    ("a big red circle", ONE, "wrong_size"),
    ("a red circle at the top", ONE, "wrong_position"),
    ("a red circle on a striped background", ONE, "wrong_background"),
    ("a red red circle", ONE, "unparseable"),
    ("a red circle circle", ONE, "unparseable"),
    ("a red circle on the left on the left", ONE, "unparseable"),
    ("a red circle left of a blue square", ONE, "extra_object"),
    ("a red circle on the left", PAIR, "missing_object"),
    ("a small red circle left of two big blue squares", PAIR, "correct"),
    ("two big blue squares to the right of a small red circle", PAIR, "correct"),
    ("two blue squares and a red circle, the circle left of the squares", PAIR, "correct"),  # B named first
    ("two big blue squares left of a small red circle", PAIR, "wrong_relation"),
    ("a red circle above two blue squares", PAIR, "wrong_relation"),
    ("a red circle and two blue squares, the squares left of the circle", PAIR, "wrong_relation"),
    ("a red circle and two blue squares, the star left of the squares", PAIR, "unparseable"),
    ("a red circle left of a blue square", PAIR, "wrong_count"),
    ("a large red circle left of two blue squares", PAIR, "wrong_size"),
    ("a red circle left of two blue squares on a plain background", PAIR, "wrong_background"),
    ("a blue circle left of two red squares", PAIR, "wrong_colour"),
])
def test_hand_written_errors(text, scene, label):
    got, detail = check_caption(text, scene)
    assert got == label, detail
    assert (detail == "") == (label == "correct")
    assert got == "correct" or got in CHECK_LABELS


def test_objects_right_ignores_size_layout_and_background():
    assert objects_right("a big red circle at the top against a brick wall", ONE)
    assert not objects_right("two red circles", ONE) and not objects_right("a red circle", PAIR)
    assert objects_right("two blue squares above a red circle", PAIR)  # wrong relation, right objects
    assert not objects_right("a red red circle", ONE)


# ---- (d) the scenes of generated web images ---------------------------------------------------------

TINY = GenerateConfig(seed=5, web=60, human=0, val=0, test=0, zeroshot=0, shard_size=20, noise_rate=0.3,
                      world=WorldConfig(image_size=32, supersample=1))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caption_check") / "generated"
    generate(TINY, str(root), splits=("web",), processes=1, progress=False)
    return root


def _texts(web: Path) -> dict[str, str]:
    out = {}
    for tar in sorted(web.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    out[m.name[:-4]] = tf.extractfile(m).read().decode()
    return out


def test_scene_of_web_reproduces_the_generated_scenes(world):
    cfg = generator_config(world / "web")
    assert cfg == TINY
    texts, labels = _texts(world / "web"), noise_labels(world / "web")
    assert len(texts) == 60 and sum(v is None for v in labels.values()) == 42
    for key, text in texts.items():
        label = check_caption(text, scene_of_web(key, cfg))[0]
        if labels[key] is None:
            assert label == "correct", (key, text)
        elif labels[key] in ("wrong_count", "generic", "filename", "spam"):
            assert label != "correct", (key, text, labels[key])
    assert scene_of_web("000020003", cfg) == scene_of_web(43, cfg)  # shard 2, index 3 in the shard
    with pytest.raises(KeyError, match="000030000"):
        scene_of_web("000030000", cfg)  # shard 3 does not exist: 60 images


def test_real_web_data_is_refused_naming_the_file(world, tmp_path):
    real = tmp_path / "download" / "web"
    real.mkdir(parents=True)
    write_raw_tar(real / "00000.tar", sample("000000000", image_bytes(), "a dog on a beach", {"key": "000000000"}))
    with pytest.raises(NotGeneratedWorld, match=r"manifest\.json not found.*generated world"):
        generator_config(real)
    (real.parent / "manifest.json").write_text(json.dumps({"generator": "blip.data.importers (coco)", "splits": {}}))
    with pytest.raises(NotGeneratedWorld, match=r"download/manifest\.json was written by 'blip.data.importers"):
        check_synthetic(world / "nothing.parquet", real)


# ---- (e) check_synthetic on a hand-made score table, and the stage and report that show it ----------


def _score_table(world: Path, path: Path) -> None:
    """All 60 web keys: 20 true synthetic captions (p 0.9), 10 with a wrong count (p 0.2, one 0.6),
    5 junk (p 0.1), the rest without a synthetic caption; web texts as the filter stores them."""
    cfg, texts = generator_config(world / "web"), _texts(world / "web")
    rng = np.random.default_rng(1)
    rows = []
    for i, key in enumerate(sorted(texts)):
        scene = scene_of_web(key, cfg)
        syn, p = None, None
        if i < 20:
            syn, p = describe(scene, rng), 0.9
        elif i < 30:
            syn, p = describe(perturb_count(scene, rng), rng), 0.6 if i == 20 else 0.2
        elif i < 35:
            syn, p = "image 42", 0.1
        rows.append({"key": key, "web_text": pre_caption(texts[key], 30), "syn_text": syn, "itm_web": 0.5,
                     "itm_syn": p, "itc_web": 0.1, "itc_syn": None if p is None else p / 2, "status": "ok"})
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_check_synthetic_counts_exactly(world, tmp_path):
    _score_table(world, tmp_path / "00000.parquet")
    m = check_synthetic(tmp_path, world / "web", threshold=0.5)
    assert (m["n"], m["n_images"], m["n_correct"], m["n_scored"]) == (35, 35, 20, 35)
    assert m["true_noise_ratio"] == pytest.approx(15 / 35) and m["objects_right"] == pytest.approx(20 / 35)
    assert (m["kept"], m["dropped"]) == (21, 14) and m["filter_rejected_ratio"] == pytest.approx(14 / 35)
    assert m["kept_noise_ratio"] == pytest.approx(1 / 21)
    assert m["auc_itm"] == 1.0 and m["auc_itc"] == 1.0
    per = m["per_label"]
    assert set(per) == {"correct", *CHECK_LABELS}
    assert {k: v["count"] for k, v in per.items() if v["count"]} == {"correct": 20, "wrong_count": 10, "unparseable": 5}
    assert (per["correct"]["kept_fraction"], per["wrong_count"]["kept"], per["unparseable"]["kept"]) == (1.0, 1, 0)
    assert per["wrong_count"]["fraction"] == pytest.approx(10 / 35) and per["wrong_count"]["kept_fraction"] == 0.1
    assert 42 / 60 <= m["web_text_correct"] < 1.0  # every clean web text, and few noisy ones, are true


def test_check_synthetic_checks_every_candidate(world, tmp_path):
    cfg = generator_config(world / "web")
    keys = sorted(_texts(world / "web"))[:3]
    rng = np.random.default_rng(2)
    cands = [[describe(scene_of_web(k, cfg), rng), "a red red circle"] for k in keys]
    pq.write_table(pa.Table.from_pylist([
        {"key": k, "syn_text": c[0], "itm_syn": 0.8, "syn_candidates": c, "itm_cand": [0.8, 0.3], "status": "ok"}
        for k, c in zip(keys, cands)] + [{"key": "000000005", "syn_text": "x", "itm_syn": None, "syn_candidates": None,
                                          "itm_cand": None, "status": "unreadable_image"}]), tmp_path / "00000.parquet")
    m = check_synthetic(tmp_path / "00000.parquet", world / "web")
    assert (m["n"], m["n_images"], m["n_correct"], m["auc_itm"]) == (6, 3, 3, 1.0)
    assert m["per_label"]["unparseable"]["count"] == 3 and "auc_itc" in m["skipped"]  # no ITC column


def test_filter_quality_stage_writes_synthetic_check_and_the_report_shows_it(world, tmp_path):
    from blip.stages.capfilt import filter_quality
    from blip.stages.evaluate import report

    params = params_module.load(ROOT / "params.yaml")
    scores = tmp_path / "scores"
    scores.mkdir()
    _score_table(world, scores / "00000.parquet")
    filter_quality(None, params, NullTracker(), scores=str(scores), web=[str(world / "web")], out=str(tmp_path / "fq.json"))
    fq = json.loads((tmp_path / "fq.json").read_text())
    assert fq["n"] == 60 and fq["synthetic_check"]["n"] == 35  # the filter's own metrics are still there
    assert fq["synthetic_check"]["threshold"] == params.assemble.threshold
    (tmp_path / "eval.json").write_text(json.dumps({"test/r_mean": 10.0}))
    report(None, params, NullTracker(), metrics=[f"baseline={tmp_path / 'eval.json'}"], out=str(tmp_path / "report.md"),
           filter_quality=str(tmp_path / "fq.json"))
    md = (tmp_path / "report.md").read_text()
    assert "True synthetic noise ratio **0.429**" in md and "filter-rejected ratio 0.400" in md
    assert "| wrong_count | 10 | 0.286 | 0.10 |" in md and "ITM **1.000**" in md

    table = pq.read_table(scores / "00000.parquet")  # the filter ran without the captioner's output
    i = table.column_names.index("syn_text")
    pq.write_table(table.set_column(i, "syn_text", pa.nulls(table.num_rows, pa.string())), scores / "00000.parquet")
    filter_quality(None, params, NullTracker(), scores=str(scores), web=[str(world / "web")], out=str(tmp_path / "fq.json"))
    absent = json.loads((tmp_path / "fq.json").read_text())["synthetic_check"]
    assert set(absent) == {"absent"} and "no synthetic captions" in absent["absent"]
    assert synthetic_check_table(absent).startswith("Not measured: ")


def test_a_manifest_that_does_not_describe_its_shards_is_refused(world, tmp_path):
    import shutil

    copy = tmp_path / "generated"
    shutil.copytree(world, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["seed"] = 6  # e.g. a later run that regenerated only other splits
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _score_table(world, tmp_path / "00000.parquet")
    with pytest.raises(ValueError, match="does not describe them"):
        check_synthetic(tmp_path / "00000.parquet", copy / "web")
