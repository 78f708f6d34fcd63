"""Bad input never crashes the loader and is never lost silently: exact counts per reason."""

import io
import json
import os
import tarfile

import pytest
from fixtures_data import image_bytes, sample, write_raw_tar
from PIL import Image

from blip.data.decode import DecodeConfig
from blip.data.loader import make_loader
from blip.data.stats import DataError
from blip.data.tario import RawSample, ShardEnd, iter_shard_samples, write_tar


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    good = image_bytes()
    jpg_half = image_bytes((32, 32))[:200]  # valid header, pixel data cut off
    write_raw_tar(d / "images.tar", [
        *sample("000000000", good),
        *sample("000000001", b"this is not a jpeg at all"),
        *sample("000000002", image_bytes(mode="CMYK")),
        *[(n.replace(".jpg", ".png"), b) for n, b in sample("000000003", image_bytes(mode="RGBA", fmt="PNG"))],
        *sample("000000004", image_bytes(mode="L")),
        *[(n.replace(".jpg", ".png"), b) for n, b in sample("000000005", image_bytes(mode="P", fmt="PNG"))],
        *sample("000000006", image_bytes((1, 1))),
        *sample("000000007", image_bytes((5000, 100))),
        *sample("000000008", jpg_half),
        *[(n.replace(".jpg", ".png"), b) for n, b in sample("000000009", image_bytes(mode="LA", fmt="PNG"))],
    ])
    write_raw_tar(d / "captions.tar", [
        *sample("000010000", good, txt=None, meta={"url": "x"}),
        *sample("000010001", good, txt=None, meta={"caption": "A caption from JSON."}),
        *sample("000010002", good, txt=""),
        *sample("000010003", good, txt=" ... !!! ### "),
        *sample("000010004", good, txt=b"caf\xe9 au lait"),
        *sample("000010005", good, txt="word " * 2000),
        *sample("000010006", None, txt="no image here"),
        *[*sample("000010007", good, txt="bad json"), ("000010007.json", b"{not json")],
    ])
    three = [m for i in range(3) for m in sample(f"00002000{i}", image_bytes((40, 40), colour=(i * 50, 0, 0)))]
    raw = write_raw_tar(d / "full.tar", three)
    # cut inside the image data of the third sample
    offset = _data_offset(raw, "000020002.jpg")
    (d / "truncated.tar").write_bytes(raw[: offset + 100])
    # cut exactly after the second sample: no end-of-archive blocks
    (d / "cut_at_boundary.tar").write_bytes(raw[: _data_offset(raw, "000020002.jpg") - 512])
    (d / "garbage.tar").write_bytes(b"\x13\x37" * 3000)
    return d


def _data_offset(raw: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return tf.getmember(name).offset_data


def _run(urls, **cfg):
    loader = make_loader(urls, train=False, batch_size=4, **cfg)
    batches = list(loader)
    loader.epoch_stats.check()  # input == used + skipped
    return loader.epoch_stats, batches


def test_image_problems_are_converted_or_skipped_by_reason(broken):
    st, batches = _run([str(broken / "images.tar")])
    assert st.seen == 10 and st.used == 7
    assert dict(st.skipped) == {"undecodable_image": 2, "image_too_small": 1}
    assert dict(st.converted) == {"mode_CMYK": 1, "mode_RGBA": 1, "mode_L": 1, "mode_P": 1, "mode_LA": 1, "image_downscaled": 1}
    keys = [k for b in batches for k in b["key"]]
    assert keys == ["000000000", "000000002", "000000003", "000000004", "000000005", "000000007", "000000009"]
    for b in batches:
        assert b["image"].shape[1:] == (3, 64, 64)


def test_caption_problems_are_converted_or_skipped_by_reason(broken):
    st, batches = _run([str(broken / "captions.tar")])
    assert st.seen == 8 and st.used == 4
    assert dict(st.skipped) == {"missing_caption": 1, "empty_caption": 2, "missing_image": 1}
    assert dict(st.converted) == {"caption_from_json": 1, "caption_not_utf8": 1, "caption_truncated": 1, "json_unreadable": 1}
    texts = dict(zip([k for b in batches for k in b["key"]], [t for b in batches for t in b["text"]], strict=True))
    assert texts["000010001"] == "a caption from json"
    assert texts["000010004"] == "café au lait"  # cp1252 fallback, not U+FFFD
    assert len(texts["000010005"].split(" ")) == 30  # pre_caption max_words
    assert texts["000010007"] == "bad json"


def test_damaged_tars_count_the_lost_sample_and_the_shard(broken, caplog):
    st, batches = _run([str(broken / "truncated.tar"), str(broken / "cut_at_boundary.tar"), str(broken / "garbage.tar")])
    # truncated: 2 good + the cut one; boundary cut: 1 good + the last (can't know it is whole)
    assert st.seen == 5 and st.used == 3
    assert dict(st.skipped) == {"truncated_tar": 2}
    assert dict(st.shard_errors) == {"truncated_tar": 2, "corrupt_tar": 1}
    assert [k for b in batches for k in b["key"]] == ["000020000", "000020001", "000020000"]
    assert "truncated_tar 2" in caplog.text  # reported, not only counted
    # ... and named: every damaged shard, every skipped sample (shard, key, reason)
    assert {os.path.basename(u): why.split(":")[0] for u, why in st.damaged.items()} == {
        "truncated.tar": "truncated_tar", "cut_at_boundary.tar": "truncated_tar", "garbage.tar": "corrupt_tar"}
    assert sorted(map(tuple, st.named)) == [("broken0/cut_at_boundary.tar", "000020001", "truncated_tar"),
                                            ("broken0/truncated.tar", "000020002", "truncated_tar")]
    assert "truncated.tar (truncated_tar" in caplog.text and "garbage.tar (corrupt_tar" in caplog.text
    assert "truncated.tar/000020002 (truncated_tar)" in caplog.text


def test_a_missing_shard_path_is_an_error_naming_it_before_anything_is_read(broken, tmp_path):
    """A mistyped folder beside a real one used to train on the real one alone, with only an
    epoch-end count `unreadable_shard 3`; now nothing starts."""
    from blip.data.corpus import caption_corpus

    typo = str(tmp_path / "data" / "generatd" / "web")
    for spec in ([typo, str(broken / "full.tar")], typo, str(broken / "does_not_exist.tar"),
                 str(broken / "{full,nothere}.tar")):
        with pytest.raises(FileNotFoundError, match="does not exist.*check the path") as e:
            make_loader(spec, train=False, batch_size=4)
        assert ("generatd" in str(e.value)) or ("does_not_exist" in str(e.value)) or ("nothere" in str(e.value))
    with pytest.raises(FileNotFoundError, match="generatd"):
        list(caption_corpus([str(broken / "full.tar"), typo]))


def test_shards_without_samples_are_named_with_what_was_found(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "00000.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"00000\.tar \(0 bytes") as e:
        make_loader(str(tmp_path / "empty"), train=False, batch_size=4)
    assert "num_samples" not in str(e.value) and "blip.data inspect" in str(e.value)


def test_too_many_skipped_samples_fail_naming_the_reasons_and_shards(broken, caplog):
    with pytest.raises(DataError, match=r"3 of 10 samples skipped \(30% > the ceiling 10%\).*undecodable_image 2.*"
                                        r"broken0/images\.tar \(3\)"):
        _run([str(broken / "images.tar")], max_skipped_fraction=0.1)
    st, _ = _run([str(broken / "images.tar")], max_skipped_fraction=0.3)  # at the ceiling: goes on
    assert st.used == 7


def test_all_bad_inputs_together_in_training_with_two_workers(broken):
    urls = [str(broken / n) for n in ("images.tar", "captions.tar", "truncated.tar", "full.tar")]
    loader = make_loader(urls, train=True, batch_size=4, num_workers=2, num_samples=16, shuffle_buffer=4)
    n = sum(len(b["text"]) for b in loader)
    assert n == len(loader) * 4 == 16
    loader.epoch_stats.check()
    assert loader.epoch_stats.pairs == 16


def test_too_many_pixels_is_skipped_before_decoding(broken):
    st, _ = _run([str(broken / "images.tar")], decode=DecodeConfig(max_image_pixels=100_000))
    assert st.skipped["image_too_large"] == 1  # the 5000x100 one


def test_tar_reader_reports_damage_instead_of_ending_quietly(broken, tmp_path):
    items = list(iter_shard_samples(str(broken / "cut_at_boundary.tar")))
    assert [type(i).__name__ for i in items] == ["RawSample", "RawSample", "ShardEnd"]
    assert items[1].error == "truncated_tar" and items[-1].error == "truncated_tar"
    # long names (PAX headers) and directories are handled
    long_key = "sub/" + "k" * 150
    write_tar(str(tmp_path / "long.tar"), [(f"{long_key}.jpg", b"x"), (f"{long_key}.txt", b"y")])
    items = list(iter_shard_samples(str(tmp_path / "long.tar")))
    assert isinstance(items[0], RawSample) and items[0].key == long_key and set(items[0].fields) == {"jpg", "txt"}
    assert isinstance(items[1], ShardEnd) and items[1].error is None


def test_tar_reader_closed_early_closes_its_file_even_at_interpreter_exit(tmp_path, monkeypatch):
    """A loader left open until interpreter exit is closed during module teardown, when the
    modules the reader's ``except`` clauses name may already be ``None``: closing must still
    close the file and raise nothing (it printed "Exception ignored ... TypeError" before)."""
    import blip.data.tario as tario

    write_tar(str(tmp_path / "two.tar"), [("a.txt", b"x"), ("b.txt", b"y")])
    opened = []
    real_open = tario.open_shard
    monkeypatch.setattr(tario, "open_shard", lambda url: opened.append(real_open(url)) or opened[-1])
    gen = tario.iter_shard_samples(str(tmp_path / "two.tar"))
    assert next(gen).key == "a"
    monkeypatch.setattr(tario, "zlib", None)  # what module teardown leaves
    monkeypatch.setattr(tario, "gzip", None)
    gen.close()
    assert opened and opened[0].closed


def test_downscaled_image_keeps_aspect_ratio(broken):
    from blip.data.decode import decode_sample
    from blip.data.stats import LoaderStats

    raw = RawSample("k", {"jpg": image_bytes((5000, 100)), "txt": b"wide"})
    st = LoaderStats()
    s = decode_sample(raw, DecodeConfig(max_image_side=1000), st)
    assert s.image.size == (1000, 20) and s.image.mode == "RGB" and st.converted["image_downscaled"] == 1


def test_transparent_pixels_become_white(broken):
    from blip.data.decode import decode_sample
    from blip.data.stats import LoaderStats

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(buf, format="PNG")
    s = decode_sample(RawSample("k", {"png": buf.getvalue(), "json": json.dumps({"caption": "x"}).encode()}), DecodeConfig(), LoaderStats())
    assert s.image.getpixel((0, 0)) == (255, 255, 255)
