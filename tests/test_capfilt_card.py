"""The dataset card of an assembled CapFilt folder: front matter, counts, and its load snippets run
for real (webdataset, ``datasets`` through the card's configs and features, ``make_loader``)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from braceexpand import braceexpand
from PIL import Image

from blip.capfilt.card import brace_pattern, size_category, write_card
from blip.data.shards import dumps, write_shard, write_sizes

NAME = "boot"


def image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format=fmt)
    return buf.getvalue()


def sample(key: str, ext: str, image: bytes, caption: str, source: str, scores: tuple | None, orig: str, **extra) -> dict:
    itm, logit, itc = scores or (None, None, None)
    meta = {"key": key, "caption": caption, "status": "success", "image_id": int(key), "caption_source": source,
            "itm": itm, "itm_logit": logit, "itc": itc, "orig_key": orig[1], "orig_shard": orig[0], **extra}
    return {"key": key, "ext": ext, "image": image, "caption": caption, "meta": meta}


def write_block(folder: Path, shard: int, samples: list[dict]) -> None:
    """One output tar as assemble's ``_OutputShards`` writes it (members, _stats.json extras)."""
    members, sources, texts = [], {}, {}
    for s in samples:
        members += [(f"{s['key']}.{s['ext']}", s["image"]), (f"{s['key']}.txt", s["caption"].encode()),
                    (f"{s['key']}.json", dumps(s["meta"]))]
        src = s["meta"]["caption_source"]
        sources[src] = sources.get(src, 0) + 1
        texts[src] = texts.get(src, 0) + len(s["meta"].get("captions", [s["caption"]]))
    write_shard(str(folder), shard, members, len(samples), sum(texts.values()),
                extra_stats={"sources": sources, "source_texts": texts})


@pytest.fixture()
def assembled(tmp_path) -> tuple[Path, dict, list[dict]]:
    """An assembled folder: a human block (00000), two web blocks (00001, 00003; id 00002 unused, a
    gap as assemble leaves), jpg and png images, byod web metadata, stats.json in assemble's format."""
    out = tmp_path / NAME
    red, blue, green = image_bytes("JPEG", (200, 30, 30)), image_bytes("PNG", (30, 30, 200)), image_bytes("JPEG", (30, 200, 30))
    caps = [["a red square", "a square in red", "red block"], ["a gray field", "grey field", "plain gray"]]
    human = [sample(f"00000000{i}", "jpg", image_bytes("JPEG", (9 * i, 90, 90)), c[0], "human", None,
                    ("human/00000.tar", f"00000000{i}"), captions=c) for i, c in enumerate(caps)]
    web0 = [sample("000010000", "jpg", red, "red thing online", "web", (0.81, 1.45, 0.31), ("web/00000.tar", "000000000")),
            sample("000010001", "jpg", red, "a red square on white", "synthetic", (0.92, 2.4, 0.35),
                   ("web/00000.tar", "000000000"), image_id=10000),
            sample("000010002", "png", blue, "blue picture", "web", (0.64, 0.58, 0.22), ("web/00000.tar", "000000002"),
                   url="https://example.com/b.png", width=16, height=12)]
    web1 = [sample("000030000", "jpg", green, "a green square", "synthetic", (0.55, 0.2, 0.18), ("web/00001.tar", "000000001"))]
    for shard, block in ((0, human), (1, web0), (3, web1)):
        write_block(out, shard, block)
    write_sizes(str(out), {"00000.tar": 2, "00001.tar": 3, "00003.tar": 1})
    (out / "manifest").mkdir()
    stats = {
        "parts": "both", "use_filter": True, "use_captioner": True, "threshold": 0.5, "candidates": 1, "score": "itm",
        "units": {"human": "images (kept with all their captions)", "web": "texts (one per web image)",
                  "synthetic": "texts (1 drawn per usable web image)"},
        "sources": {"human": {"input": 3, "kept": 2, "dropped": 1, "dropped_by": {"duplicate_image": 1}},
                    "web": {"input": 4, "kept": 2, "dropped": 2, "dropped_by": {"filter": 2}},
                    "synthetic": {"input": 4, "kept": 2, "dropped": 2, "dropped_by": {"empty_caption": 1, "filter": 1}}},
        "noise_ratio": 0.25, "web_drop_ratio": 0.5, "texts": {"human": 6, "web": 2, "synthetic": 2, "total": 10},
        "samples": 6, "images": 5, "shards": 3,
        "rule": {"name": "threshold", "threshold": 0.5, "score": "itm"}, "dedup": {"mode": "image", "duplicates": 1},
        "repeated_texts": {"image": 3}, "future_metric": 0.125,
        "histograms": {"itm_all_web": {"edges": [0.0, 0.5, 1.0], "counts": [2, 2]}},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    return out, stats, human + web0 + web1


def card_parts(path: str) -> tuple[dict, str]:
    text = Path(path).read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, "no front matter"
    return yaml.safe_load(m.group(1)), m.group(2)


def test_card_front_matter_counts_and_sections(assembled):
    out, stats, samples = assembled
    (out / "gallery.png").write_bytes(image_bytes("PNG", (0, 0, 0)))
    models = {"captioner": {"path": "models/captioner", "digest": "sha256:abc"}, "filter": None}
    path = write_card(out, models=models, gallery="gallery.png")
    assert path == str(out / "README.md")
    meta, body = card_parts(path)
    assert meta["license"] == "other" and meta["pretty_name"]
    assert meta["task_categories"] == ["image-to-text", "text-to-image"]
    assert meta["size_categories"] == ["n<1K"] and meta["tags"] == ["webdataset", "capfilt", "blip"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}]
    features = {f["name"]: f for f in meta["dataset_info"]["features"]}
    assert features["jpg"]["dtype"] == features["png"]["dtype"] == "image" and features["txt"]["dtype"] == "string"
    json_fields = {f["name"]: f for f in features["json"]["struct"]}
    assert json_fields["itm"]["dtype"] == "float64" and json_fields["captions"]["list"] == "string"
    assert {"url", "width", "orig_shard"} <= set(json_fields)  # the union over all samples, not the first few
    for source, c in stats["sources"].items():  # the counts table equals stats.json
        row = next(r for r in body.splitlines() if r.startswith(f"| {source} |"))
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[2:5] == [str(c["input"]), str(c["kept"]), str(c["dropped"])]
        assert cells[5] == (", ".join(f"{k} {v}" for k, v in c["dropped_by"].items()) or "-")
    selection = body.split("## Selection")[1].split("## Models")[0]
    for key in ("parts", "threshold", "noise_ratio", "web_drop_ratio", "rule", "dedup", "repeated_texts", "future_metric"):
        assert f"**{key}**" in selection, key
    assert "| captioner | models/captioner | sha256:abc |" in body and "| filter | not recorded | not recorded |" in body
    assert "**itm, web** (2 texts)" in body and "**itc, synthetic** (2 texts)" in body and "**itm_all_web**" in body
    assert "![gallery](gallery.png)" in body
    assert Path(write_card(out, models=models, gallery="gallery.png")).read_text() == Path(path).read_text()  # deterministic
    _, bare = card_parts(write_card(out, gallery="missing.png"))
    assert "## Gallery" not in bare and "not recorded" in bare.split("## Models")[1].split("##")[0]


def test_card_snippets_load_every_sample(assembled, tmp_path):
    """The card's own code blocks, run in a fresh interpreter (offline, a private HF cache)."""
    out, _, samples = assembled
    _, body = card_parts(write_card(out))
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert len(blocks) == 3
    pattern = re.search(r'wds\.WebDataset\("([^"]+)"\)', blocks[0]).group(1)
    assert pattern.startswith(f"{NAME}/")
    assert sorted(braceexpand(pattern)) == sorted(f"{NAME}/{p.name}" for p in out.glob("*.tar"))
    probe = "\n".join([
        "import json, sys", f"blocks = {blocks!r}", "ns = [{}, {}, {}]",
        "for code, n in zip(blocks, ns): exec(code, n)",
        "wds_rows = [(t, m['key']) for _, t, m in ns[0]['ds']]",
        "hf = ns[1]['ds']",  # the second load_dataset (webdataset builder, features from the card)
        "import datasets", f"card = datasets.load_dataset({NAME!r}, split='train')",
        "json.dump({'wds': sorted(wds_rows), 'hf': sorted(zip(hf['txt'], hf['__key__'])),"
        " 'card': sorted(zip(card['txt'], card['__key__'])), 'pngs': sum(x is not None for x in card['png']),"
        " 'pairs': ns[2]['loader'].num_items}, sys.stdout)",
    ])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", probe], cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    want = sorted([s["caption"], s["key"]] for s in samples)  # the .txt members
    assert got["wds"] == got["hf"] == got["card"] == want
    assert got["pngs"] == 1
    assert got["pairs"] == sum(len(s["meta"].get("captions", [1])) for s in samples)  # make_loader: one item per caption


def test_brace_pattern_and_sizes():
    assert brace_pattern(["00000.tar"]) == "00000.tar"
    assert brace_pattern(["00000.tar", "00001.tar", "00002.tar"]) == "{00000..00002}.tar"
    assert list(braceexpand(brace_pattern(["00000.tar", "00001.tar", "00004.tar"]))) == ["00000.tar", "00001.tar", "00004.tar"]
    assert [size_category(n) for n in (999, 1000, 54_000, 2_000_000)] == ["n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_missing_stats_says_run_assemble(assembled):
    out, _, _ = assembled
    (out / "stats.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"stats\.json.*assemble"):
        write_card(out)
    assert not (out / "README.md").exists()
