"""Importers on small fixtures written in the real formats (Karpathy JSON + image folders,
img2dataset output)."""

import json
import tarfile

import pytest
from fixtures_data import image_bytes, sample, write_raw_tar
from pycocotools.coco import COCO

from blip.data.__main__ import main
from blip.data.importers import (
    import_coco_karpathy,
    import_flickr_karpathy,
    inspect_shards,
)
from blip.data.labels import noise_labels
from blip.data.loader import make_loader


def _sentences(n, stem):
    return [{"tokens": f"{stem} caption {j}".split(), "raw": f"A {stem} caption number {j}.", "imgid": 0, "sentid": j} for j in range(n)]


@pytest.fixture(name="coco_fixture")
def coco_fixture_files(tmp_path):
    """Fixture ``coco_fixture``: a COCO-layout image folder + ``dataset_coco.json`` with one image
    of each kind (JPEG, greyscale, PNG named .jpg) and two that must be skipped (missing, no captions)."""
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "val2014").mkdir()
    entries = []

    def add(folder, cocoid, split, content=None, n_sent=5):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        if content is not False:
            (root / folder / name).write_bytes(content or image_bytes((48, 32), colour=(cocoid % 255, 40, 90)))
        entries.append({"filepath": folder, "filename": name, "imgid": len(entries), "split": split, "cocoid": cocoid,
                        "sentids": list(range(n_sent)), "sentences": _sentences(n_sent, f"img{cocoid}")})

    add("train2014", 9, "train")
    add("train2014", 25, "train", content=image_bytes((40, 40), mode="L"))  # greyscale JPEG: copied as is
    add("val2014", 42, "restval", content=image_bytes((30, 20), mode="RGBA", fmt="PNG"))  # PNG named .jpg
    add("val2014", 73, "val")
    add("val2014", 74, "test")
    add("val2014", 75, "test", content=False)  # listed but missing on disk
    add("val2014", 76, "test", n_sent=0)  # no captions
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root


def test_coco_karpathy_import(coco_fixture, tmp_path):
    out = tmp_path / "out"
    # 2 of 7 skipped (on purpose) is far more than the default ceiling for real data
    m = import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(coco_fixture), str(out), shard_size=2, progress=False,
                             max_skipped_fraction=0.5)
    assert {k: v["images"] for k, v in m["splits"].items()} == {"human": 3, "val": 1, "test": 1}
    assert m["splits"]["human"]["pairs"] == 15 and len(m["splits"]["human"]["shards"]) == 2
    assert m["skipped"] == {"missing_file": 1, "no_captions": 1}
    # JPEG bytes are copied unchanged; the PNG was re-encoded as JPEG
    with tarfile.open(out / "human/00000.tar") as tf:
        assert tf.extractfile("000000000.jpg").read() == (coco_fixture / "train2014/COCO_train2014_000000000009.jpg").read_bytes()
        meta = json.loads(tf.extractfile("000000001.json").read())
    with tarfile.open(out / "human/00001.tar") as tf:
        assert tf.extractfile("000010000.jpg").read()[:2] == b"\xff\xd8"
    assert meta["image_id"] == 25 and len(meta["captions"]) == 5 and meta["url"] == "train2014/COCO_train2014_000000000025.jpg"
    # GT loads and uses COCO ids
    coco = COCO(str(out / "annotations/test_gt.json"))
    assert coco.getImgIds() == [74] and len(coco.getAnnIds()) == 5
    assert coco.loadAnns(coco.getAnnIds(imgIds=74))[0]["caption"] == "A img74 caption number 0."
    # the loader reads the result: training pairs carry COCO ids
    loader = make_loader(out / "human", batch_size=5, seed=0, image_size=32)
    ids = {int(i) for b in loader for i in b["image_id"]}
    assert ids <= {9, 25, 42} and len(ids) >= 2
    loader.epoch_stats.check()
    assert loader.epoch_stats.converted["mode_L"] >= 1  # greyscale JPEG converted at load time
    ev = list(make_loader(out / "test", batch_size=4, train=False))
    assert ev[0]["captions"][0][0] == "a img74 caption number 0"  # pre_caption-ed
    # the command line gives the same result
    assert main(["import-coco", str(coco_fixture / "dataset_coco.json"), str(coco_fixture), "--out", str(tmp_path / "cli"),
                 "--shard-size", "2", "--quiet", "--max-skipped-fraction", "0.5"]) == 0
    assert (tmp_path / "cli/human/00001.tar").read_bytes() == (out / "human/00001.tar").read_bytes()


def test_flickr_karpathy_import_and_zeroshot(tmp_path):
    root = tmp_path / "flickr30k-images"
    root.mkdir()
    entries = []
    for i, split in enumerate(["train", "train", "val", "test", "test"]):
        name = f"{1000092795 + i}.jpg"
        (root / name).write_bytes(image_bytes((30, 30), colour=(i * 40, 0, 0)))
        entries.append({"filename": name, "imgid": i, "split": split, "sentids": [], "sentences": _sentences(5, f"f{i}")})
    kjson = tmp_path / "dataset_flickr30k.json"
    kjson.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    m = import_flickr_karpathy(str(kjson), str(root), str(tmp_path / "fl"), progress=False)
    assert {k: v["images"] for k, v in m["splits"].items()} == {"human": 2, "val": 1, "test": 2}
    coco = COCO(str(tmp_path / "fl/annotations/test_gt.json"))
    assert sorted(coco.getImgIds()) == [1000092798, 1000092799]
    z = import_flickr_karpathy(str(kjson), str(root), str(tmp_path / "zs"), as_zeroshot=True, progress=False)
    assert list(z["splits"]) == ["zeroshot"] and z["splits"]["zeroshot"]["images"] == 2
    assert len(COCO(str(tmp_path / "zs/annotations/zeroshot_gt.json")).getAnnIds()) == 10
    assert not (tmp_path / "zs/human").exists()


def test_bad_karpathy_file_names_the_file(tmp_path):
    bad = tmp_path / "dataset_coco.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="dataset_coco.json"):
        import_coco_karpathy(str(bad), str(tmp_path), str(tmp_path / "o"), progress=False)


def _img2dataset_folder(d):
    """What ``img2dataset --output_format webdataset`` writes: tars, per-shard stats (with failed
    downloads counted in ``count`` but absent from the tar)."""
    d.mkdir()
    for shard in range(2):
        members = []
        for i in range(5):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "caption": f"Photo {key} of a cat!", "key": key,
                    "status": "success", "error_message": None, "width": 24, "height": 24,
                    "original_width": 640, "original_height": 480, "exif": "{}", "sha256": "0" * 64}
            members += sample(key, image_bytes((24, 24)), txt=meta["caption"], meta=meta)
        write_raw_tar(d / f"{shard:05d}.tar", members)
        (d / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": 7, "successes": 5, "failed_to_download": 2, "failed_to_resize": 0, "duration": 3.2,
            "bytes_downloaded": 12345, "start_time": 1700000000.0, "end_time": 1700000003.2,
            "status_dict": {"success": 5, "HTTP Error 404": 2}}))
    return d


def test_img2dataset_folder_is_read_as_web_data_without_conversion(tmp_path):
    folder = _img2dataset_folder(tmp_path / "laion_tiny")
    info = inspect_shards(folder)
    assert info["shards"] == 2 and info["samples"] == 10  # successes, not count
    loader = make_loader(folder, batch_size=4, num_workers=2, seed=0)
    assert loader.num_items == 10 and len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4 and all(t.startswith("photo") and "!" not in t for b in batches for t in b["text"])
    loader.epoch_stats.check()
    assert noise_labels(folder) == {f"{s:05d}{i:04d}": None for s in range(2) for i in range(5)}
    ids = {int(i) for i in make_loader(folder, train=False, batch_size=10).__iter__().__next__()["image_id"]}
    assert ids == {0, 1, 2, 3, 4, 10000, 10001, 10002, 10003, 10004}  # int(key)
