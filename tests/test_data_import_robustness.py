"""Imports that go wrong say so: a wrong image root, missing images, a damaged Karpathy file and a
rerun or an interrupted run into an existing output folder. Real Karpathy files and JPEG folders
in tmp_path; the only stand-in is a shard writer that fails partway (an interrupted run)."""

import json
import os
import subprocess
import sys

import pytest
from fixtures_data import image_bytes, tree_bytes
from test_data_importers import _sentences, coco_fixture_files  # noqa: F401 (fixture)

import blip.data.generator as generator_module
import blip.data.importers as importers_module
from blip.data.__main__ import main
from blip.data.generator import GenerateConfig, generate
from blip.data.importers import import_coco_karpathy, import_flickr_karpathy
from blip.data.loader import make_loader


def _coco_folder(root, n, missing=(), split_of=lambda i: "train"):
    """COCO-layout folder with ``n`` images (``missing``: indexes listed in the JSON but not on disk)."""
    (root / "train2014").mkdir(parents=True)
    entries = []
    for i in range(n):
        name = f"COCO_train2014_{i + 1:012d}.jpg"
        if i not in missing:
            (root / "train2014" / name).write_bytes(image_bytes((24, 24), colour=(i * 9 % 255, 50, 50)))
        entries.append({"filepath": "train2014", "filename": name, "imgid": i, "split": split_of(i), "cocoid": i + 1,
                        "sentids": [], "sentences": _sentences(2, f"c{i}")})
    kjson = root / "dataset_coco.json"
    kjson.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return kjson


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def _fail_on_call(monkeypatch, module, n):
    """The module's ``write_shard`` raises on its ``n``-th call (after n - 1 shards were written)."""
    real, calls = module.write_shard, []

    def write_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_shard", write_shard)


# 1. a wrong image root


def test_wrong_image_root_fails_naming_the_root_and_a_path_it_looked_for(coco_fixture, tmp_path, capsys):
    kjson, wrong = coco_fixture / "dataset_coco.json", tmp_path / "not_coco"
    wrong.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        import_coco_karpathy(str(kjson), str(wrong), str(tmp_path / "out"), progress=False)
    msg = str(e.value)
    assert str(wrong) in msg and os.path.join(str(wrong), "train2014", "COCO_train2014_000000000009.jpg") in msg
    assert "none of the" in msg and "train2014/" in msg  # says what the root should hold
    assert not (tmp_path / "out").exists()
    # the command line: non-zero exit, the message, no traceback, nothing written
    assert main(["import-coco", str(kjson), str(wrong), "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "python -m blip.data import-coco: error:" in err and str(wrong) in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_image_root_that_does_not_exist_is_named(coco_fixture, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(tmp_path / "nowhere"), str(tmp_path / "out"),
                             progress=False)


def test_a_split_whose_images_are_all_missing_fails(tmp_path):
    # train2014 present, the test split's images all absent: an empty test split would pass unnoticed
    kjson = _coco_folder(tmp_path / "coco", 40, missing={38, 39}, split_of=lambda i: "test" if i >= 38 else "train")
    with pytest.raises(FileNotFoundError, match=r"split 'test'.*COCO_train2014_000000000039\.jpg"):
        import_coco_karpathy(str(kjson), str(tmp_path / "coco"), str(tmp_path / "out"), progress=False)


# 2. some images missing: every one named, a ceiling on how many


def test_skipped_images_are_listed_in_the_output_and_the_summary(coco_fixture, tmp_path, capsys):
    kjson, out = coco_fixture / "dataset_coco.json", tmp_path / "out"
    m = import_coco_karpathy(str(kjson), str(coco_fixture), str(out), progress=False, max_skipped_fraction=0.5)
    assert m["skipped"] == {"missing_file": 1, "no_captions": 1}
    rows = [json.loads(line) for line in (out / "test/skipped.jsonl").read_text().splitlines()]
    assert rows == [
        {"file": "val2014/COCO_val2014_000000000075.jpg", "image_id": 75, "index": 5, "split": "test",
         "path": str(coco_fixture / "val2014/COCO_val2014_000000000075.jpg"), "reason": "missing_file"},
        {"file": "val2014/COCO_val2014_000000000076.jpg", "image_id": 76, "index": 6, "split": "test",
         "path": str(coco_fixture / "val2014/COCO_val2014_000000000076.jpg"), "reason": "no_captions"}]
    assert (out / "human/skipped.jsonl").read_text() == ""  # nothing skipped there, and it says so
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["test"]["skipped"] == {"missing_file": 1, "no_captions": 1}
    assert manifest["splits"]["test"]["skipped_list"] == "test/skipped.jsonl"
    # the console names them
    assert main(["import-coco", str(kjson), str(coco_fixture), "--out", str(tmp_path / "cli"), "--quiet",
                 "--max-skipped-fraction", "0.5"]) == 0
    stdout = capsys.readouterr().out
    assert "skipped: missing_file 1, no_captions 1" in stdout
    assert "missing_file  val2014/COCO_val2014_000000000075.jpg (test, image id 75)" in stdout
    assert "no_captions   val2014/COCO_val2014_000000000076.jpg (test, image id 76)" in stdout
    assert "test/skipped.jsonl" in stdout


def test_summary_shows_the_first_five_skipped_and_the_rest_by_count(tmp_path, capsys):
    kjson = _coco_folder(tmp_path / "coco", 30, missing=set(range(0, 24, 3)))  # 8 of 30 missing
    assert main(["import-coco", str(kjson), str(tmp_path / "coco"), "--out", str(tmp_path / "out"), "--quiet",
                 "--max-skipped-fraction", "0.3"]) == 0
    stdout = capsys.readouterr().out
    assert "skipped: missing_file 8" in stdout
    named = [line for line in stdout.splitlines() if "COCO_train2014_" in line]
    assert len(named) == 5 and "COCO_train2014_000000000001.jpg" in named[0]
    assert "... and 3 more" in stdout
    assert len((tmp_path / "out/human/skipped.jsonl").read_text().splitlines()) == 8


def test_too_many_skipped_fails_naming_reasons_and_files_and_writes_nothing(coco_fixture, tmp_path, capsys):
    kjson, out = coco_fixture / "dataset_coco.json", tmp_path / "out"
    with pytest.raises(ValueError) as e:  # 2 of 7 skipped > the default 5 %
        import_coco_karpathy(str(kjson), str(coco_fixture), str(out), progress=False)
    msg = str(e.value)
    assert "2 of 7" in msg and "max_skipped_fraction" in msg and "0.05" in msg
    assert "missing_file 1" in msg and "COCO_val2014_000000000075.jpg" in msg
    assert "no_captions 1" in msg and "COCO_val2014_000000000076.jpg" in msg
    assert not out.exists() and _siblings(out) == []
    assert main(["import-coco", str(kjson), str(coco_fixture), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--max-skipped-fraction" in err and "Traceback" not in err
    # under the ceiling it goes through
    kjson2 = _coco_folder(tmp_path / "big", 40, missing={7})  # 2.5 %
    m = import_coco_karpathy(str(kjson2), str(tmp_path / "big"), str(tmp_path / "big_out"), progress=False)
    assert m["splits"]["human"]["images"] == 39 and m["skipped"] == {"missing_file": 1}


def test_undecodable_images_count_towards_the_ceiling(tmp_path):
    kjson = _coco_folder(tmp_path / "coco", 10)
    for i in (2, 5):
        (tmp_path / f"coco/train2014/COCO_train2014_{i + 1:012d}.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"undecodable_image 2 \(e\.g\. .*COCO_train2014_000000000003\.jpg"):
        import_coco_karpathy(str(kjson), str(tmp_path / "coco"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_max_skipped_fraction_is_checked(coco_fixture, tmp_path):
    with pytest.raises(ValueError, match="max_skipped_fraction=1.5"):
        import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(coco_fixture), str(tmp_path / "o"),
                             progress=False, max_skipped_fraction=1.5)


# 3. reruns and interrupted runs replace the output in one step


def test_rerun_with_another_shard_size_leaves_no_old_shards(coco_fixture, tmp_path):
    kjson, out = str(coco_fixture / "dataset_coco.json"), tmp_path / "out"
    import_coco_karpathy(kjson, str(coco_fixture), str(out), shard_size=1, progress=False, max_skipped_fraction=0.5)
    assert sorted(p.name for p in (out / "human").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    import_coco_karpathy(kjson, str(coco_fixture), str(out), shard_size=2, progress=False, max_skipped_fraction=0.5)
    assert sorted(p.name for p in (out / "human").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sorted(p.name for p in (out / "human").glob("*_stats.json")) == ["00000_stats.json", "00001_stats.json"]
    ids = [int(i) for b in make_loader(out / "human", batch_size=8, train=False) for i in b["image_id"]]
    assert sorted(ids) == [9, 25, 42]  # each image once
    assert _siblings(out) == []


def test_interrupted_import_leaves_the_previous_output_intact(coco_fixture, tmp_path, monkeypatch):
    kjson, out = str(coco_fixture / "dataset_coco.json"), tmp_path / "out"
    import_coco_karpathy(kjson, str(coco_fixture), str(out), shard_size=1, progress=False, max_skipped_fraction=0.5)
    before = tree_bytes(out)
    _fail_on_call(monkeypatch, importers_module, 2)
    with pytest.raises(OSError, match="No space left"):
        import_coco_karpathy(kjson, str(coco_fixture), str(out), shard_size=2, progress=False, max_skipped_fraction=0.5)
    assert tree_bytes(out) == before and _siblings(out) == []


def test_stale_temporary_folder_of_a_killed_run_is_removed(coco_fixture, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    out = tmp_path / "out"
    stale = tmp_path / f"out.tmp-{int(dead.stdout)}"
    (stale / "human").mkdir(parents=True)
    (stale / "human/00000.tar").write_bytes(b"half a shard")
    import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(coco_fixture), str(out), progress=False,
                         max_skipped_fraction=0.5)
    assert not stale.exists() and _siblings(out) == []
    assert (out / "human/00000.tar").exists()


def test_previous_output_of_a_run_killed_between_its_renames_is_put_back(coco_fixture, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    out = tmp_path / "out"
    aside = tmp_path / f"out.old-{int(dead.stdout)}"  # renamed aside, the new one never renamed in
    (aside / "notes").mkdir(parents=True)
    (aside / "notes/README.txt").write_text("mine")
    import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(coco_fixture), str(out), progress=False,
                         max_skipped_fraction=0.5)
    assert (out / "notes/README.txt").read_text() == "mine" and (out / "human/00000.tar").exists()
    assert _siblings(out) == []


def test_importing_more_splits_into_the_same_folder_keeps_the_others(coco_fixture, tmp_path):
    # README: COCO as human/val/test, then Flickr30k's test split as zeroshot/ into the same folder
    out = tmp_path / "out"
    import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(coco_fixture), str(out), progress=False,
                         max_skipped_fraction=0.5)
    coco_files = tree_bytes(out)
    root = tmp_path / "flickr"
    root.mkdir()
    entries = []
    for i, split in enumerate(["train", "test", "test"]):
        name = f"{1000092795 + i}.jpg"
        (root / name).write_bytes(image_bytes((30, 30)))
        entries.append({"filename": name, "imgid": i, "split": split, "sentences": _sentences(5, f"f{i}")})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    import_flickr_karpathy(str(tmp_path / "dataset_flickr30k.json"), str(root), str(out), as_zeroshot=True, progress=False)
    after = tree_bytes(out)
    assert all(after[p] == b for p, b in coco_files.items() if p != "manifest.json")
    assert "zeroshot/00000.tar" in after and "annotations/zeroshot_gt.json" in after
    manifest = json.loads(after["manifest.json"])
    assert sorted(manifest["splits"]) == ["human", "test", "val", "zeroshot"]
    assert manifest["splits"]["human"]["source"].endswith("dataset_coco.json")
    assert manifest["splits"]["zeroshot"]["source"].endswith("dataset_flickr30k.json")


def test_an_existing_folder_that_holds_other_files_keeps_them(coco_fixture, tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes/README.txt").write_text("mine")
    import_coco_karpathy(str(coco_fixture / "dataset_coco.json"), str(coco_fixture), str(out), progress=False,
                         max_skipped_fraction=0.5)
    assert (out / "notes/README.txt").read_text() == "mine" and (out / "human/00000.tar").exists()


def test_interrupted_generate_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    cfg = GenerateConfig(web=12, human=4, val=2, test=2, zeroshot=2, shard_size=4)
    generate(cfg, str(out), processes=1, progress=False)
    before = tree_bytes(out)
    _fail_on_call(monkeypatch, generator_module, 2)
    with pytest.raises(OSError, match="No space left"):
        generate(GenerateConfig(seed=1, web=12, human=4, val=2, test=2, zeroshot=2, shard_size=3), str(out),
                 processes=1, progress=False)
    assert tree_bytes(out) == before and _siblings(out) == []


def test_generate_some_splits_again_keeps_the_others(tmp_path):
    out = tmp_path / "gen"
    generate(GenerateConfig(web=12, human=4, val=2, test=2, zeroshot=2, shard_size=4), str(out), processes=1, progress=False)
    before = tree_bytes(out)
    generate(GenerateConfig(web=12, shard_size=5), str(out), splits=("web",), processes=1, progress=False)
    after = tree_bytes(out)
    assert sorted(p for p in after if p.startswith("web/") and p.endswith(".tar")) == ["web/00000.tar", "web/00001.tar", "web/00002.tar"]
    assert {p: b for p, b in after.items() if not p.startswith("web/") and p != "manifest.json"} == \
           {p: b for p, b in before.items() if not p.startswith("web/") and p != "manifest.json"}
    assert sorted(json.loads(after["manifest.json"])["splits"]) == ["human", "test", "val", "web", "zeroshot"]
    assert _siblings(out) == []


# 4. a damaged or wrong Karpathy file


def _entry(**over):
    e = {"filepath": "train2014", "filename": "COCO_train2014_000000000001.jpg", "imgid": 0, "split": "train",
         "cocoid": 1, "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}]}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


GOOD = json.dumps({"images": [_entry(), _entry(imgid=1, cocoid=2, filename="COCO_train2014_000000000002.jpg")]})


@pytest.mark.parametrize("content, expected", [
    ("{not json", r"not valid JSON \(Expecting property name"),
    (GOOD[: len(GOOD) // 2], r"not valid JSON .*truncated"),
    ("", "not valid JSON"),
    (json.dumps([_entry()]), r"top level is a list.*'images'"),
    (json.dumps({"annotations": []}), r"no 'images' list"),
    (json.dumps({"images": [_entry(), "x.jpg"]}), r"images\[1\] is a str, not an object"),
    (json.dumps({"images": [_entry(), _entry(filename=None)]}), r"images\[1\] has no 'filename' string"),
    (json.dumps({"images": [_entry(sentences=None)]}), r"images\[0\] has no 'sentences' list"),
    (json.dumps({"images": [_entry(sentences="A cat.")]}), r"images\[0\] has no 'sentences' list \(got str\)"),
    (json.dumps({"images": [_entry(sentences=[{"raw": "ok"}, {"sentid": 3}])]}),
     r"images\[0\]\.sentences\[1\] has neither a 'raw' string nor a 'tokens' list"),
    (json.dumps({"images": [_entry(split=None)]}), r"images\[0\] has no 'split' string"),
    (json.dumps({"images": [_entry(cocoid=None, imgid=None, filename="cat.jpg")]}),
     r"images\[0\] has no image id: no 'cocoid' integer, no number as file name \('cat\.jpg'\), no 'imgid' integer"),
    (json.dumps({"images": [_entry(split="training")]}), r"no image in the splits .*'train'.*found 'training'"),
])
def test_bad_karpathy_file_names_the_file_and_the_field(tmp_path, content, expected):
    kjson = tmp_path / "dataset_coco.json"
    kjson.write_text(content)
    with pytest.raises(ValueError, match=expected) as e:
        import_coco_karpathy(str(kjson), str(tmp_path), str(tmp_path / "out"), progress=False)
    assert str(e.value).startswith(f"{kjson}: ")
    assert "expected" in str(e.value).lower()  # and says what is expected
    assert not (tmp_path / "out").exists()


def test_several_bad_entries_are_counted_and_the_first_shown(tmp_path):
    kjson = tmp_path / "dataset_coco.json"
    kjson.write_text(json.dumps({"images": [_entry(sentences=None) for _ in range(9)]}))
    with pytest.raises(ValueError, match=r"9 malformed image entries.*images\[0\].*images\[4\].*expected") as e:
        import_coco_karpathy(str(kjson), str(tmp_path), str(tmp_path / "out"), progress=False)
    assert "images[5]" not in str(e.value)


def test_bad_flickr_file_through_the_command_line(tmp_path, capsys):
    kjson = tmp_path / "dataset_flickr30k.json"
    kjson.write_text(json.dumps([{"filename": "1.jpg"}]))
    assert main(["import-flickr", str(kjson), str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m blip.data import-flickr: error: {kjson}: the top level is a list")
    assert "Traceback" not in err


def test_generate_command_reports_bad_input_without_a_traceback(tmp_path, capsys):
    for args, expected in ((["--shard-size", "0"], "shard_size=0: must be in 1..10000"),
                           (["--noise-mix", "{spam"], "--noise-mix '{spam' is not JSON"),
                           (["--splits", "web,foo"], "unknown splits ['foo']")):
        assert main(["generate", "--out", str(tmp_path / "g"), "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m blip.data generate: error: {expected}") and "Traceback" not in err
    assert not (tmp_path / "g").exists()
