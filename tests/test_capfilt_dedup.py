"""blip.capfilt.dedup on real webdataset tars: planted exact duplicates (image bytes, urls), a
sample without an image, unreadable and missing urls, a truncated shard; and repeated texts."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from blip.capfilt import dedup
from blip.capfilt.dedup import find_duplicates, repeated_texts
from blip.data.shards import dumps, write_shard
from blip.data.tario import ShardEnd, iter_shard_samples

COLORS = {"A": (255, 0, 0), "B": (0, 255, 0), "C": (0, 0, 255), "D": (9, 9, 9), "E": (50, 60, 70),
          "F": (200, 100, 0), "G": (0, 100, 200), "H": (1, 2, 3), "I": (4, 5, 6)}
NO_URL = object()  # json without a url field
BAD_JSON = object()  # .json that is not JSON

# (key, image letter or None, url / NO_URL / BAD_JSON / non-string, text), per shard in assemble order
HUMAN = [("h0", "A", "u/a", "a red square"), ("h1", "B", "u/b", "a green square"),
         ("h2", "A", "u/a2", "a red square"),  # same bytes as h0: image duplicate within a shard
         ("h3", None, "u/x", "no image here")]  # no image member: unreadable
WEB0 = [("w0", "B", "u/b2", "a dog"),  # same bytes as h1 (other shard, other url): image duplicate
        ("w1", "C", "u/a", "a dog"),  # url of h0, other bytes: url duplicate
        ("w2", "D", NO_URL, "Image  placeholder"),
        ("w3", "E", BAD_JSON, "image placeholder"),
        ("w4", "A", "u/a3", "IMAGE PLACEHOLDER "),  # third copy of A
        ("w5", "H", "", "a cat"),  # empty url: no url
        ("w6", "I", 7, "a bird")]  # non-string url: no url
WEB1 = [("w10", "F", "u/f", "\timage placeholder"), ("w11", "C", "u/c2", "a fish"),  # image dup of w1
        ("w12", "G", "u/b", "a tree"),  # url dup of h1
        ("w13", "A", "u/a", "cut"), ("w14", "B", "u/b", "unread")]  # behind the damage: never read
CUT_AT = "w13"


def png(letter: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), COLORS[letter]).save(buf, format="PNG")
    return buf.getvalue()


def members(samples) -> list[tuple[str, bytes]]:
    out = []
    for key, img, url, text in samples:
        if img is not None:
            out.append((f"{key}.png", png(img)))
        out.append((f"{key}.txt", text.encode()))
        meta = b'{"url": "u/broken' if url is BAD_JSON else dumps({} if url is NO_URL else {"url": url})
        out.append((f"{key}.json", meta))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("dedup")
    human = write_shard(str(root / "human"), 0, members(HUMAN), len(HUMAN), len(HUMAN))
    web0 = write_shard(str(root / "web"), 0, members(WEB0), len(WEB0), len(WEB0))
    web1 = write_shard(str(root / "web"), 1, members(WEB1), len(WEB1), len(WEB1))
    with tarfile.open(web1) as tf:  # cut the tar inside CUT_AT's image data
        cut = next(m for m in tf.getmembers() if m.name == f"{CUT_AT}.png").offset_data + 10
    with open(web1, "r+b") as f:
        f.truncate(cut)
    end = list(iter_shard_samples(web1))[-1]
    assert isinstance(end, ShardEnd) and end.error == "truncated_tar"  # the fixture really is damaged
    return [human, web0, web1]


def test_image_mode_finds_exactly_the_planted_copies(shards):
    human, web0, web1 = shards
    d = find_duplicates(shards, "image")
    assert d.drop == {human: {"h2": "human/00000.tar/h0"},
                      web0: {"w0": "human/00000.tar/h1", "w4": "human/00000.tar/h0"},
                      web1: {"w11": "web/00000.tar/w1"}}
    c = d.counts
    assert c == {"n_samples_read": 14, "n_unique": 9, "n_duplicates": 4, "n_groups": 3, "no_url": 0, "unreadable": 1}
    assert c["n_samples_read"] == c["n_unique"] + c["n_duplicates"] + c["unreadable"]
    assert d.top == [{"key": "human/00000.tar/h0", "copies": 3}, {"key": "human/00000.tar/h1", "copies": 2},
                     {"key": "web/00000.tar/w1", "copies": 2}]
    stats = json.loads(json.dumps(d.to_stats()))
    assert stats["mode"] == "image" and stats["n_duplicates"] == 4 and stats["top"] == d.top


def test_url_mode_finds_exactly_the_planted_copies(shards):
    human, web0, web1 = shards
    d = find_duplicates(shards, "url")
    assert d.drop == {web0: {"w1": "human/00000.tar/h0"}, web1: {"w12": "human/00000.tar/h1"}}
    c = d.counts
    assert c == {"n_samples_read": 14, "n_unique": 7, "n_duplicates": 2, "n_groups": 2, "no_url": 3, "unreadable": 2}
    assert c["n_samples_read"] == c["n_unique"] + c["n_duplicates"] + c["no_url"] + c["unreadable"]
    assert d.top == [{"key": "human/00000.tar/h0", "copies": 2}, {"key": "human/00000.tar/h1", "copies": 2}]


def test_first_occurrence_follows_shard_order(shards):
    human, web0, web1 = shards
    d = find_duplicates([web0, human, web1], "image")  # web0 first: its copies are now the originals
    assert d.drop[human] == {"h0": "web/00000.tar/w4", "h1": "web/00000.tar/w0", "h2": "web/00000.tar/w4"}
    assert "w0" not in d.drop.get(web0, {}) and "w4" not in d.drop.get(web0, {})


def test_none_reads_nothing_and_bad_modes_and_lists_are_named(shards, monkeypatch, tmp_path):
    def no_reading(*a, **k):
        raise AssertionError("mode none must not read shards")

    monkeypatch.setattr(dedup, "iter_shard_samples", no_reading)
    d = find_duplicates(shards + [str(tmp_path / "missing.tar")], "none")
    assert d.drop == {} and d.top == [] and set(d.counts.values()) == {0}
    assert d.to_stats()["mode"] == "none"
    with pytest.raises(ValueError, match="allowed: image, url, none"):
        find_duplicates(shards, "phash")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="more than once"):
        find_duplicates([shards[0], shards[0]], "image")


def test_repeated_texts_finds_the_placeholder(shards):
    pairs = [(f"{os.path.basename(s.url)}/{s.key}", s.fields["txt"].decode())
             for url in shards[1:] for s in iter_shard_samples(url) if not isinstance(s, ShardEnd) and not s.error]
    pairs.append(pairs[2])  # the same (image, text) pair twice counts once
    r = repeated_texts(pairs)
    # "image placeholder" on w2, w3, w4, w10 (case and whitespace differ); "a dog" on 2 images only
    assert r == {"min_images": 3, "n_texts_repeated": 1, "n_pairs_affected": 4,
                 "top": [{"text": "image placeholder", "images": 4}]}
    assert repeated_texts(pairs, min_images=2)["top"] == [{"text": "image placeholder", "images": 4},
                                                           {"text": "a dog", "images": 2}]
    assert repeated_texts(pairs, min_images=5)["n_texts_repeated"] == 0
    with pytest.raises(ValueError, match="min_images"):
        repeated_texts(pairs, min_images=0)
