"""The generated world: determinism, layout, noise at the set rate, COCO ground truth."""

import json
import re
import tarfile
from collections import Counter

import pytest
from fixtures_data import SMALL_WORLD, small_world_fixture, tree_bytes  # noqa: F401 (fixture)

from blip.data.generator import SPLITS, GenerateConfig, generate, make_sample
from blip.data.grammar import vocabulary
from blip.data.labels import noise_labels
from blip.data.noise import NOISE_KINDS, noise_plan
from blip.data.world import (
    TRAIN_BACKGROUNDS,
    ZEROSHOT_BACKGROUNDS,
    WorldConfig,
    sample_rngs,
    sample_scene,
)


def test_same_seed_gives_byte_identical_output_whatever_the_process_count(small_world, tmp_path):
    # the session fixture was written with 1 process; write again with 2
    generate(GenerateConfig(**SMALL_WORLD), str(tmp_path / "again"), processes=2, progress=False)
    a, b = tree_bytes(small_world), tree_bytes(tmp_path / "again")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.endswith(".tar") for k in a)


def test_different_seed_gives_different_data(small_world, tmp_path):
    cfg = GenerateConfig(**{**SMALL_WORLD, "seed": SMALL_WORLD["seed"] + 1})
    generate(cfg, str(tmp_path / "other"), splits=("web",), processes=1, progress=False)
    assert (small_world / "web/00000.tar").read_bytes() != (tmp_path / "other/web/00000.tar").read_bytes()


def test_layout_follows_img2dataset(small_world):
    manifest = json.loads((small_world / "manifest.json").read_text())
    assert set(manifest["splits"]) == set(SPLITS)
    assert manifest["splits"]["web"]["images"] == 120 and len(manifest["splits"]["web"]["shards"]) == 6
    assert manifest["splits"]["human"]["pairs"] == 24 * 5
    for split in SPLITS:
        sizes = json.loads((small_world / split / "sizes.json").read_text())
        assert sum(sizes.values()) == SMALL_WORLD[split]
        stats = json.loads((small_world / split / "00000_stats.json").read_text())
        assert stats["successes"] == stats["count"] == min(20, SMALL_WORLD[split])
    with tarfile.open(small_world / "web/00001.tar") as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        meta = json.loads(tf.extractfile("000010003.json").read())
    assert names[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"]
    assert all(re.fullmatch(r"\d{9}\.(jpg|txt|json)", n) for n in names)
    assert {"key", "caption", "url", "status", "width", "height", "original_width", "noise"} <= set(meta)
    assert meta["key"] == "000010003" and meta["status"] == "success" and meta["width"] == 64
    with tarfile.open(small_world / "human/00000.tar") as tf:
        hmeta = json.loads(tf.extractfile("000000001.json").read())
        txt = tf.extractfile("000000001.txt").read().decode()
    assert len(hmeta["captions"]) == 5 and len(set(hmeta["captions"])) == 5
    assert txt == hmeta["captions"][0] and hmeta["image_id"] == 1


def test_noise_rate_and_kinds_match_the_setting():
    n, rate = 1000, 0.4
    plan = noise_plan(n, rate, {"unrelated": 1, "wrong_attribute": 1, "wrong_count": 1, "generic": 1, "filename": 1, "spam": 1}, seed=0)
    counts = Counter(plan)
    assert n - counts[None] == 400
    assert all(abs(counts[k] - 400 / 6) <= 1 for k in NOISE_KINDS)
    assert noise_plan(n, rate, {"spam": 1}, 0) != noise_plan(n, rate, {"spam": 1}, 1)  # positions depend on seed


def test_written_noise_labels_match_manifest_and_rate(small_world):
    labels = noise_labels(small_world / "web")
    assert len(labels) == 120
    counts = Counter(labels.values())
    assert abs((120 - counts[None]) / 120 - 0.4) < 0.01
    manifest = json.loads((small_world / "manifest.json").read_text())
    assert manifest["noise_summary"]["kinds"] == {k: counts[k] for k in NOISE_KINDS}
    assert all(counts[k] > 0 for k in NOISE_KINDS)


def test_each_noise_kind_really_corrupts_the_caption():
    cfg = GenerateConfig(seed=1, web=200)
    patterns = {"filename": r".*\.(jpg|JPG|png|jpeg|tif)|Screenshot .*", "generic": r"[a-z #0-9]+", "spam": r"[a-z0-9 %]+"}
    numbers = {"a", "an", "one", "single", "two", "pair", "three"}
    for i, kind in enumerate(NOISE_KINDS):
        for index in range(10 * i, 10 * i + 10):
            _, (clean,), _ = make_sample(cfg, "web", index, None)
            _, (noisy,), got = make_sample(cfg, "web", index, kind)
            assert got == kind and noisy != clean
            if kind in patterns:
                assert re.fullmatch(patterns[kind], noisy), (kind, noisy)
            if kind in ("wrong_attribute", "wrong_count"):  # same frame, a few words changed
                a, b = clean.lower().split(), noisy.lower().split()
                changed = set(a) ^ set(b)
                assert 0 < len(changed) <= 6, (clean, noisy)
                if kind == "wrong_count":
                    assert changed & numbers, (clean, noisy)


def test_coco_ground_truth_loads_with_pycocotools(small_world):
    from pycocotools.coco import COCO

    for split in ("val", "test", "zeroshot"):
        coco = COCO(str(small_world / "annotations" / f"{split}_gt.json"))
        assert len(coco.getImgIds()) == 12
        assert len(coco.getAnnIds()) == 60
        img = coco.loadImgs(coco.getImgIds()[3])[0]
        caps = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
        with tarfile.open(small_world / split / "00000.tar") as tf:
            meta = json.loads(tf.extractfile(f"{img['key']}.json").read())
        assert meta["image_id"] == img["id"] and meta["captions"] == caps


def test_zeroshot_uses_unseen_backgrounds():
    cfg = WorldConfig()
    seen = {sample_scene(sample_rngs(0, "human", i)[0], cfg, TRAIN_BACKGROUNDS).background for i in range(200)}
    assert seen == set(TRAIN_BACKGROUNDS) and not seen & set(ZEROSHOT_BACKGROUNDS)


def test_vocabulary_size_is_a_parameter():
    small, full = vocabulary(WorldConfig(n_shapes=3, n_colours=4)), vocabulary(WorldConfig(n_shapes=8, n_colours=12))
    assert len(small) < len(full)
    assert "hexagon" in full and "hexagon" not in small and "cyan" not in small


def test_image_size_is_a_parameter():
    img, caps, _ = make_sample(GenerateConfig(world=WorldConfig(image_size=32)), "human", 0)
    assert img.size == (32, 32) and len(caps) == 5


def test_bad_config_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="shard_size"):
        GenerateConfig(shard_size=20000)
    with pytest.raises(ValueError, match="unknown kinds"):
        GenerateConfig(noise_mix={"typo": 1.0})
