"""Fuzzing the shard readers with real shards (hypothesis): whatever is done to a shard's bytes or
members, no reader raises and no sample disappears without being counted.

A web and a human shard (6 samples each) come from the project's generator once per module; every
example writes a mutated copy (members dropped, duplicated, moved, renamed or replaced by odd
captions, JSON and images; bytes cut, flipped, overwritten, zeroed; header fields rewritten with a
valid checksum; gzip-compressed before or after the damage) and reads it with:

- ``iter_shard_samples`` (tar level): samples, then exactly one ``ShardEnd``; only the last sample
  may carry the damage, and only when the ``ShardEnd`` names it; undamaged data reads back exactly;
- the training loader (``make_loader``, evaluation mode): ``seen == used + skipped`` and ``seen``
  is every sample of the shard; every skip and shard error has a known reason;
- CapFilt's ``ShardReader``: one key and one status per sample; batches hold exactly the ``ok`` rows;
  the damage is in ``shard_error``;
- caption byte decoding (``decode_caption``, ``pre_caption``) on arbitrary bytes.

Examples are derandomized (the same on every run) and not stored (no ``.hypothesis`` database).
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from blip.capfilt.reader import DUPLICATE_KEY, ShardReader
from blip.capfilt.records import OK
from blip.data.generator import GenerateConfig, generate
from blip.data.loader import make_loader
from blip.data.tario import (
    BLOCK,
    RawSample,
    ShardEnd,
    iter_shard_samples,
    split_name,
    write_tar,
)
from blip.data.text import decode_caption, pre_caption, word_count

N = 6  # samples per generated shard
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SHARD_ERRORS = {"truncated_tar", "corrupt_tar"}  # what a readable but damaged file ends in
SKIP_REASONS = SHARD_ERRORS | {"missing_image", "missing_caption", "empty_caption", "undecodable_image",
                               "image_too_large", "image_too_small"}


# ---- the real shards ----


@dataclass(frozen=True)
class Shard:
    raw: bytes  # the generated tar, byte for byte
    members: tuple[tuple[str, bytes], ...]


class Corpus:
    """The generated shards by split, and ``work``: a folder for the mutated copy (no sizes.json,
    no _stats.json beside it, so the loader counts its samples itself)."""

    def __init__(self, shards: dict[str, Shard], work):
        self.shards, self.work = shards, work

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Corpus({sorted(self.shards)}, {self.work})"

    @property
    def url(self) -> str:
        return str(self.work / "shard.tar")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("fuzz")
    generate(GenerateConfig(seed=0, web=N, human=N, val=0, test=0, zeroshot=0, shard_size=N),
             str(root / "gen"), processes=1, progress=False)
    shards = {}
    for split in ("web", "human"):
        raw = (root / "gen" / split / "00000.tar").read_bytes()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            members = tuple((m.name, tf.extractfile(m).read()) for m in tf.getmembers())
        assert len(members) == 3 * N
        shards[split] = Shard(raw, members)
    work = root / "mutated"
    work.mkdir()
    return Corpus(shards, work)


# ---- payloads (big or binary ones by name, so a failing example prints readably) ----


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (IHDR only, no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


@cache
def special() -> dict[str, bytes]:
    s = {
        # captions (.txt)
        "txt_huge_caption": b"a red square on the left " * 42_000,  # ~1 MB of words
        "txt_huge_word": b"x" * 1_000_000,
        "txt_latin1": "café crème, naïve façade".encode("latin-1"),
        "txt_invalid_utf8": b"a \xc3\x28 red \xa0\xa1 square \xff\xfe",
        "txt_utf16_bom": "a red square".encode("utf-16"),
        "txt_utf8_bom": b"\xef\xbb\xbfa red square",
        "txt_nuls": b"\x00" * 16,
        "txt_nul_inside": b"a red\x00 square",
        "txt_whitespace": b" \t\n\r \x0b\x0c ",
        "txt_emoji": "🐶🐱 🎉".encode(),
        "txt_punct": b"...!!!### ~~~",
        "txt_empty": b"",
        # metadata (.json)
        "json_deep_list": b"[" * 100_000,
        "json_deep_dict": b'{"a":' * 100_000,
        "json_deep_captions": b'{"captions": ' + b"[" * 100_000,
        "json_not_json": b"{not json",
        "json_list": b'[1, "two", {"captions": ["a dog"]}]',
        "json_null": b"null",
        "json_string": b'"a red square"',
        "json_long_int": b"1" * 5000,  # over Python's int-digits limit
        "json_utf16": '{"caption": "a dog"}'.encode("utf-16"),
        "json_bad_utf8": b'{"caption": "a \xff dog"}',
        "json_nan_id": b'{"image_id": NaN, "caption": "a dog"}',
        "json_inf_id": b'{"image_id": 1e999}',
        "json_empty": b"",
        **{f"json_{k}": json.dumps(v).encode() for k, v in {
            "captions_empty": {"captions": []},
            "captions_str": {"captions": "a dog"},
            "captions_mixed": {"captions": ["a dog", 5, None]},
            "captions_nested": {"captions": [["a dog"]]},
            "captions_blank": {"captions": ["", "   ", "..."]},
            "captions_huge": {"captions": ["word " * 50_000]},
            "caption_int": {"caption": 5},
            "caption_only": {"caption": "a caption from json"},
            "id_huge": {"image_id": 10**30},
            "id_neg_huge": {"image_id": -(2**70)},
            "id_str": {"image_id": "12"},
            "id_bool": {"image_id": True},
            "id_float": {"image_id": 1.5},
        }.items()},
        # images (.jpg)
        "img_empty": b"",
        "img_garbage": b"this is not an image " * 10,
        "img_jpeg_header_only": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        "img_png_bomb": _png_header(100_000, 100_000),  # PIL refuses before decoding
        "img_png_large": _png_header(10_000, 10_000),  # over max_image_pixels, no pixel data
        "img_one_pixel": _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "JPEG"),
        "img_thin": _encode(Image.new("RGB", (3, 100), (255, 0, 0)), "JPEG"),
        "img_wide": _encode(Image.new("RGB", (2000, 40), (0, 0, 255)), "JPEG"),
        "img_cmyk": _encode(Image.new("CMYK", (16, 16), (0, 200, 200, 0)), "JPEG"),
        "img_rgba": _encode(Image.new("RGBA", (16, 16), (10, 200, 10, 128)), "PNG"),
        "img_p_transparent": _encode(Image.new("P", (16, 16), 3), "PNG", transparency=0),
        "img_la": _encode(Image.new("LA", (16, 16), (100, 128)), "PNG"),
        "img_i16": _encode(Image.new("I;16", (16, 16), 30000), "PNG"),
        "img_1bit": _encode(Image.new("1", (16, 16), 1), "PNG"),
        "img_gif": _encode(Image.new("P", (16, 16), 5), "GIF"),
        "img_tiff_float": _encode(Image.new("F", (16, 16), 0.5), "TIFF"),
    }
    return s


def _named(prefix: str) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(k for k in special() if k.startswith(prefix)))


def resolve(payload) -> bytes:
    return special()[payload] if isinstance(payload, str) else payload


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["captions", "caption", "image_id", "noise", "x"]) | st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)
TXT = _named("txt_") | st.binary(max_size=40) | st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass"))
JSON = _named("json_") | st.binary(max_size=40) | _json_values.map(lambda v: json.dumps(v).encode())
IMG = _named("img_") | st.binary(max_size=40) | st.tuples(st.just("cut"), st.integers(0, 3000))
KEYS = st.sampled_from(["①②", "²", "9" * 25, "9" * 5000, "", "a b", "sub/dir/k", "é\nnew line", "x" * 150,
                        "dot.ted", "000000000", "-1"]) | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
IDX = st.integers(0, 10_000)  # taken modulo the number of members / samples

CONTENT_OP = st.one_of(  # a sample's files replaced, its key changed, the sample repeated
    st.tuples(st.just("txt"), IDX, TXT),
    st.tuples(st.just("json"), IDX, JSON),
    st.tuples(st.just("jpg"), IDX, IMG),
    st.tuples(st.just("rename"), IDX, KEYS),
    st.tuples(st.just("dup_sample"), IDX, st.booleans()),  # adjacent, or appended at the end
)
MEMBER_OP = st.one_of(
    st.tuples(st.just("drop"), IDX),
    st.tuples(st.just("dup_member"), IDX),  # a copy right after it: an extension repeats in a sample
    st.tuples(st.just("move"), IDX, IDX),
    CONTENT_OP,
)

HEADER_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "chksum": (148, 8), "typeflag": (156, 1),
                 "linkname": (157, 100), "magic": (257, 8), "prefix": (345, 155)}
HEADER_VALUES = st.sampled_from([b"\x80" + b"\xff" * 11, b"\xff" * 12, b"77777777777\x00", b"-0000000010\x00",
                                 b"00000001000\x00", b"00000000000\x00", b"8", b"5", b"x", b"L", b"g", b"2", b"\x00",
                                 b"ustar\x0000", b"../../etc/passwd"]) | st.binary(max_size=12)
BYTE_OP = st.one_of(
    st.tuples(st.just("truncate"), IDX),
    st.tuples(st.just("flip"), IDX, st.integers(1, 255)),
    st.tuples(st.just("overwrite"), IDX, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("zero_block"), IDX),
    st.tuples(st.just("header"), IDX, st.sampled_from(sorted(HEADER_FIELDS)), HEADER_VALUES),  # checksum fixed
)


@dataclass(frozen=True)
class Plan:
    split: str
    member_ops: tuple = ()
    byte_ops: tuple = ()
    gzip: str | None = None  # "inner": damage inside a valid gzip stream; "outer": damage the gzip stream


PLANS = st.builds(
    Plan,
    split=st.sampled_from(["web", "human"]),
    member_ops=st.lists(MEMBER_OP, max_size=3).map(tuple),
    byte_ops=st.lists(BYTE_OP, max_size=2).map(tuple),
    gzip=st.sampled_from([None, None, "inner", "outer"]),
)
# what the loader and CapFilt read: any damage, or (half the time) a valid tar of odd samples
READER_PLANS = PLANS | st.builds(Plan, split=st.sampled_from(["web", "human"]),
                                 member_ops=st.lists(CONTENT_OP, min_size=1, max_size=4).map(tuple))


# ---- applying a plan ----


def groups(members) -> list[tuple[str, dict[str, bytes]]]:
    """The samples a tar of ``members`` holds, by webdataset's rule (a new sample where the key
    changes) and tario's (or where an extension repeats)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    for name, data in members:
        key, ext = split_name(name)
        if not out or out[-1][0] != key or ext in out[-1][1]:
            out.append((key, {}))
        out[-1][1][ext] = data
    return out


def _sample_key(ms, i: int) -> str | None:
    keys = [k for k, _ in groups(ms)]
    return keys[i % len(keys)] if keys else None


def _replace(ms: list, key: str, ext: str, new) -> None:
    """Replace ``key.ext`` (``new``: bytes, or a function of the old bytes), or add it after the key's last member."""
    for j, (name, data) in enumerate(ms):
        if split_name(name) == (key, ext):
            ms[j] = (name, new(data) if callable(new) else new)
            return
    last = max((j for j, (name, _) in enumerate(ms) if split_name(name)[0] == key), default=len(ms) - 1)
    ms.insert(last + 1, (f"{key}.{ext}", new(b"") if callable(new) else new))


def apply_member_ops(members, ops) -> list[tuple[str, bytes]]:
    ms = list(members)
    for op in ops:
        kind = op[0]
        if not ms:
            break
        i = op[1] % len(ms)
        if kind == "drop":
            del ms[i]
        elif kind == "dup_member":
            ms.insert(i + 1, ms[i])
        elif kind == "move":
            ms.insert(op[2] % len(ms), ms.pop(i))
        else:
            key = _sample_key(ms, op[1])
            mine = [j for j, (name, _) in enumerate(ms) if split_name(name)[0] == key]
            if kind == "dup_sample":
                copies = [ms[j] for j in mine]
                pos = mine[-1] + 1 if op[2] else len(ms)
                ms[pos:pos] = copies
            elif kind == "rename":
                for j in mine:
                    ext = split_name(ms[j][0])[1]
                    ms[j] = (f"{op[2]}.{ext}" if ext else op[2], ms[j][1])
            elif kind in ("txt", "json"):
                _replace(ms, key, kind, resolve(op[2]))
            elif kind == "jpg":
                p = op[2]
                _replace(ms, key, "jpg", (lambda old, k=p[1]: old[:k]) if isinstance(p, tuple) else resolve(p))
    return ms


def _fix_checksum(b: bytearray, at: int) -> None:
    b[at + 148 : at + 156] = b" " * 8
    b[at + 148 : at + 156] = b"%06o\x00 " % sum(b[at : at + BLOCK])


def apply_byte_ops(data: bytes, ops, headers: list[int]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            del b[op[1] % (len(b) + 1) :]
        elif not b:
            continue
        elif kind == "flip":
            b[op[1] % len(b)] ^= op[2]
        elif kind == "overwrite":
            at = op[1] % len(b)
            b[at : at + len(op[2])] = op[2][: len(b) - at]
        elif kind == "zero_block":
            at = op[1] % ((len(b) + BLOCK - 1) // BLOCK) * BLOCK
            b[at : at + BLOCK] = bytes(len(b[at : at + BLOCK]))
        elif kind == "header" and headers:
            at = headers[op[1] % len(headers)]
            start, width = HEADER_FIELDS[op[2]]
            if at + BLOCK > len(b):
                continue
            b[at + start : at + start + width] = op[3][:width].ljust(width, b"\x00")
            if op[2] != "chksum":
                _fix_checksum(b, at)
    return bytes(b)


def header_offsets(tar: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return [m.offset_data - BLOCK for m in tf.getmembers()]


def realise(corpus: Corpus, plan: Plan) -> tuple[str, list[tuple[str, bytes]]]:
    """Write the mutated shard; returns its URL and its members before any byte damage."""
    shard = corpus.shards[plan.split]
    members = apply_member_ops(shard.members, plan.member_ops) if plan.member_ops else list(shard.members)
    if plan.member_ops:
        write_tar(corpus.url, members)
        with open(corpus.url, "rb") as f:
            tar = f.read()
    else:
        tar = shard.raw
    headers = header_offsets(tar)
    header_ops = tuple(op for op in plan.byte_ops if op[0] == "header")
    other_ops = tuple(op for op in plan.byte_ops if op[0] != "header")
    if plan.gzip == "outer":
        data = apply_byte_ops(gzip.compress(apply_byte_ops(tar, header_ops, headers), mtime=0), other_ops, [])
    else:
        data = apply_byte_ops(tar, plan.byte_ops, headers)
        if plan.gzip == "inner":
            data = gzip.compress(data, mtime=0)
    with open(corpus.url, "wb") as f:
        f.write(data)
    return corpus.url, members


# ---- what every read must satisfy ----


def read_checked(url: str) -> tuple[list[RawSample], ShardEnd]:
    """``iter_shard_samples`` never raises, yields samples then one ShardEnd; only the last sample
    may be damaged, and then with the shard's reason and no fields."""
    items = list(iter_shard_samples(url))
    assert items and isinstance(items[-1], ShardEnd), items[-1:]
    raws, end = items[:-1], items[-1]
    assert all(isinstance(r, RawSample) for r in raws)
    assert end.url == url and end.error in (None, *SHARD_ERRORS), end
    for r in raws:
        assert isinstance(r.key, str) and r.url == url
        assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in r.fields.items())
    assert all(r.error is None for r in raws[:-1])
    if end.error is None:
        assert not raws or raws[-1].error is None
    elif raws:
        # the sample the damage hit is counted as damaged, never used
        assert raws[-1].error == end.error and raws[-1].fields == {}, raws[-1]
    event(f"shard end: {end.error}")  # --hypothesis-show-statistics shows what the examples reached
    return raws, end


def as_groups(raws: list[RawSample]) -> list[tuple[str, dict[str, bytes]]]:
    return [(r.key, r.fields) for r in raws]


# ---- tar level ----


@FUZZ
@given(plan=st.builds(Plan, split=st.sampled_from(["web", "human"]), member_ops=st.lists(MEMBER_OP, min_size=1, max_size=4).map(tuple),
                      gzip=st.sampled_from([None, "inner"])))
@example(plan=Plan("web", (("dup_member", 1),)))  # an extension repeated within a sample
@example(plan=Plan("web", (("rename", 0, "é\nnew line"),)))  # a PAX path holding a newline
def test_tar_reader_returns_every_member_of_an_intact_tar(corpus, plan):
    """Member-level mutations keep the tar valid: every member comes back, grouped by key, and
    nothing is reported damaged (a repeated extension starts a new sample, never overwrites)."""
    url, members = realise(corpus, plan)
    raws, end = read_checked(url)
    assert end.error is None, end
    assert as_groups(raws) == groups(members)


def _complete_samples(tar: bytes, cut: int) -> tuple[int, int]:
    """(samples whose every member ends before ``cut``, offset of the end-of-archive block)."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        ms = tf.getmembers()
    ends: dict[str, int] = {}
    for m in ms:
        ends[split_name(m.name)[0]] = m.offset_data + m.size
    eoa = ms[-1].offset_data + (ms[-1].size + BLOCK - 1) // BLOCK * BLOCK
    return sum(1 for e in ends.values() if e <= cut), eoa


@FUZZ
@given(split=st.sampled_from(["web", "human"]), cut=st.integers(0, 40_000))
@example(split="web", cut=0)
def test_truncated_shard_reports_the_cut_and_keeps_an_exact_prefix(corpus, split, cut):
    shard = corpus.shards[split]
    cut = cut % (len(shard.raw) + 1)
    with open(corpus.url, "wb") as f:
        f.write(shard.raw[:cut])
    raws, end = read_checked(corpus.url)
    complete, eoa = _complete_samples(shard.raw, cut)
    orig = groups(shard.members)
    # clean exactly when the end-of-archive block survived the cut
    assert (end.error is None) == (cut >= eoa + BLOCK), (cut, eoa, end)
    good = [r for r in raws if r.error is None]
    assert as_groups(good) == orig[: len(good)]  # what is used is exactly what was written
    # at most the last complete sample is held back (a cut header cannot tell if it was whole)
    assert len(good) >= complete - (1 if end.error else 0)
    if end.error:
        assert end.error == "truncated_tar"


@FUZZ
@given(split=st.sampled_from(["web", "human"]),
       op=st.one_of(st.tuples(st.just("flip"), IDX, st.integers(1, 255)), st.tuples(st.just("zero_block"), IDX)),
       compressed=st.booleans())
@example(split="web", op=("zero_block", 9), compressed=False)  # a zeroed header mid-shard: not a clean end
@example(split="web", op=("flip", 200, 255), compressed=True)  # damaged deflate data: a CRC mismatch
def test_damaged_byte_is_reported_or_harmless(corpus, split, op, compressed):
    """One flipped byte or one zeroed block: either the shard reports damage (and what came before
    is intact) or every sample comes back with its members (a flip in file data changes that data)."""
    shard = corpus.shards[split]
    plan = Plan(split, byte_ops=(op,), gzip="outer" if compressed else None)
    url, _ = realise(corpus, plan)
    raws, end = read_checked(url)
    orig = groups(shard.members)
    good = [r for r in raws if r.error is None]
    if compressed:
        # gzip's CRC covers every byte: the content is exact or the shard is reported
        assert end.error is not None or as_groups(raws) == orig
        return
    if end.error is None:
        assert [(k, set(f)) for k, f in as_groups(raws)] == [(k, set(f)) for k, f in orig]
        changed = sum(a != b for (_, fa), (_, fb) in zip(as_groups(raws), orig, strict=True) for a, b in
                      ((fa[e], fb[e]) for e in fa))
        assert changed <= 1
    else:
        assert end.error == "corrupt_tar"
        assert [k for k, _ in as_groups(good)] == [k for k, _ in orig[: len(good)]]


@FUZZ
@given(plan=PLANS)
@example(plan=Plan("web", byte_ops=(("header", 0, "size", b"\x80" + b"\xff" * 11),)))  # size > 2**63
@example(plan=Plan("web", byte_ops=(("truncate", 30),), gzip="outer"))  # a cut gzip header
def test_tar_reader_never_raises(corpus, plan):
    url, _ = realise(corpus, plan)
    read_checked(url)


@pytest.mark.parametrize("url", ["pipe:false", "pipe:cat /nonexistent/00000.tar", "/nonexistent/00000.tar"])
def test_failed_sources_are_reported_not_raised(url):
    items = list(iter_shard_samples(url))
    raws, end = items[:-1], items[-1]
    assert raws == [] and isinstance(end, ShardEnd) and end.error in ("truncated_tar", "unreadable_shard")


# ---- the training loader ----


def _is_subsequence(sub, seq) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)


@FUZZ
@given(plan=READER_PLANS)
@example(plan=Plan("human", member_ops=(("json", 2, "json_deep_list"),)))
@example(plan=Plan("web", member_ops=(("json", 1, "json_id_huge"), ("rename", 3, "①②"), ("rename", 4, "9" * 25))))
def test_loader_counts_every_sample_of_a_damaged_shard(corpus, plan):
    url, _ = realise(corpus, plan)
    raws, end = read_checked(url)
    loader = make_loader(url, train=False, batch_size=4, image_size=64, num_workers=0, num_samples=max(1, len(raws)))
    batches = list(loader)
    stats = loader.epoch_stats
    stats.check()
    for reason in {*stats.skipped, *stats.converted}:
        event(f"skipped/converted: {reason}")
    keys = [k for b in batches for k in b["key"]]
    assert stats.seen == len(raws)  # every sample of the shard, used or skipped
    assert stats.used == len(keys) == stats.pairs
    assert set(stats.skipped) <= SKIP_REASONS and all(v > 0 for v in stats.skipped.values()), stats.skipped
    assert dict(stats.shard_errors) == ({end.error: 1} if end.error else {})
    assert list(stats.damaged) == ([url] if end.error else []) and all(v.startswith(end.error) for v in stats.damaged.values())
    # every skipped sample is named: (shard, key, reason)
    assert Counter(reason for _, _, reason in stats.named) == stats.skipped
    assert {key for _, key, _ in stats.named} <= {r.key for r in raws}
    if raws and raws[-1].error:
        assert stats.skipped[raws[-1].error] >= 1
    assert _is_subsequence(keys, [r.key for r in raws])
    for b in batches:
        n = len(b["key"])
        assert b["image"].shape == (n, 3, 64, 64) and torch.isfinite(b["image"]).all()
        assert b["image_id"].dtype == torch.long and b["image_id"].shape == (n,)
        assert len(b["text"]) == n and all(isinstance(t, str) and t for t in b["text"])
        assert all(len(t.split(" ")) <= 30 for t in b["text"])
        assert all(caps and all(caps) for caps in b["captions"])


@settings(FUZZ, report_multiple_bugs=False)
@given(payload=JSON)
@example(payload="json_deep_list")
def test_loader_sizes_a_shard_from_its_samples_whatever_the_json(corpus, payload):
    """Without ``num_samples`` the loader counts the shard itself; odd JSON must not stop it."""
    url, _ = realise(corpus, Plan("human", member_ops=(("json", 2, payload),)))
    loader = make_loader(url, train=False, batch_size=4, image_size=64, num_workers=0)
    list(loader)
    loader.epoch_stats.check()
    assert loader.epoch_stats.seen == N


# ---- CapFilt's shard reader ----


@FUZZ
@given(plan=READER_PLANS)
@example(plan=Plan("web", member_ops=(("dup_sample", 2, False), ("txt", 0, "txt_huge_caption"))))
def test_capfilt_reader_gives_every_sample_a_verdict(corpus, plan):
    url, _ = realise(corpus, plan)
    raws, end = read_checked(url)
    reader = ShardReader(url, image_size=64, batch_size=8)
    batches = list(reader.batches())
    assert reader.keys == [r.key for r in raws]  # one row per input sample, in order
    assert len(reader.status) == len(reader.texts) == len(raws)
    first: set[str] = set()
    for status in set(reader.status):
        event(f"status: {status}")
    for key, status, text in zip(reader.keys, reader.status, reader.texts, strict=True):
        expected = {DUPLICATE_KEY} if key in first else SKIP_REASONS | {OK}
        assert status in expected, (key, status)
        assert (text is None) == (status != OK)
        first.add(key)
    ok_rows = [i for i, s in enumerate(reader.status) if s == OK]
    assert [r for b in batches for r in b.rows] == ok_rows
    for b in batches:
        assert b.keys == [reader.keys[r] for r in b.rows] and b.texts == [reader.texts[r] for r in b.rows]
        assert b.images.shape == (len(b.rows), 3, 64, 64) and 0 < len(b.rows) <= 8
    assert reader.shard_error == end.error
    if raws and raws[-1].error:  # the damaged sample's row names the damage (unless its key came before)
        assert reader.status[-1] in (raws[-1].error, DUPLICATE_KEY)
    stats = reader.stream.stats
    stats.check()
    assert stats.seen == len(raws) and stats.used == len(ok_rows)
    assert stats.skipped == Counter(s for s in reader.status if s != OK)


# ---- caption bytes ----


@FUZZ
@given(raw=_named("txt_").map(resolve) | st.binary(max_size=300)
       | st.text(max_size=60).map(lambda s: s.encode("utf-16")) | st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_caption_bytes_always_decode_to_text(raw):
    text, utf8 = decode_caption(raw)
    assert isinstance(text, str) and isinstance(utf8, bool)
    if utf8:
        assert text.encode("utf-8") == raw
    else:
        assert len(text) == len(raw)  # cp1252: one character per byte, U+FFFD for the 5 undefined
    cleaned = pre_caption(text, 30)
    assert isinstance(cleaned, str) and len(cleaned.split(" ")) <= 30
    assert cleaned == cleaned.strip(" ")
    assert word_count(text) >= 1
