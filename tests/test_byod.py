"""Bring your own data: `dvc repro byod/dvc.yaml` cleans web shards with released checkpoints
(random-weight stand-ins at the tiny size in the official .pth and the transformers layouts), on
the generated shards and on an img2dataset-shaped folder of someone else's data."""

from __future__ import annotations

import io
import json
import math
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pipeline_repo import make_repo, run

from blip.data.generator import GenerateConfig, generate
from blip.data.loader import make_loader
from blip.data.tario import RawSample, iter_shard_samples
from blip.data.text import PRETRAIN_MAX_WORDS, pre_caption
from blip.model.blip import BlipCaptioner, BlipRetrieval
from blip.model.config import load_preset
from blip.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow


def _inputs(folder: Path) -> dict[str, dict]:
    """key -> the input sample's json, for every readable sample of the folder's shards."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for s in iter_shard_samples(str(tar)):
            if isinstance(s, RawSample) and s.error is None:
                out[s.key] = json.loads(s.fields["json"])
    return out


def _img2dataset_folder(src: Path, dest: Path) -> None:
    """Someone else's img2dataset download: new keys, https urls, extra metadata, no labels; one
    failed download listed in the parquet only (img2dataset writes no tar member for it)."""
    import pyarrow as pa

    dest.mkdir(parents=True)
    samples = [s for tar in sorted(src.glob("*.tar")) for s in iter_shard_samples(str(tar)) if isinstance(s, RawSample)]
    for shard, chunk in enumerate((samples[:7], samples[7:])):
        rows, buf = [], io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i, s in enumerate(chunk):
                key = f"{shard:05d}{i:04d}"
                meta = {"url": f"https://example.com/photos/{key}.jpg", "key": key, "status": "success",
                        "caption": s.fields["txt"].decode(), "width": 64, "height": 64, "original_width": 640,
                        "original_height": 480, "exif": "{}", "sha256": f"{i:064x}", "error_message": None}
                for ext, data in (("jpg", s.fields["jpg"]), ("txt", s.fields["txt"]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                rows.append(meta)
        rows.append({**rows[-1], "key": f"{shard:05d}9999", "status": "failed_to_download", "error_message": "404"})
        (dest / f"{shard:05d}.tar").write_bytes(buf.getvalue())
        (dest / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(chunk) + 1, "successes": len(chunk),
                                                                "failed_to_download": 1, "failed_to_resize": 0}))
        pq.write_table(pa.Table.from_pylist(rows), dest / f"{shard:05d}.parquet")


def _checkpoints(root: Path, tok) -> dict[str, str]:
    from blip.convert import save_hf

    cfg = load_preset("tiny", vision={"heads": 2}, text={"num_attention_heads": 2, **tok.special_ids}, queue_size=64)
    torch.manual_seed(0)
    cap, ret = BlipCaptioner(cfg), BlipRetrieval(cfg)
    root.mkdir()
    torch.save({"model": cap.state_dict()}, root / "model_base_caption_capfilt_large.pth")
    torch.save({"model": ret.state_dict()}, root / "model_base_retrieval_coco.pth")
    vocab = tok.hf.get_vocab()
    (root / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    save_hf(cap, root / "blip-image-captioning-tiny", kind="captioner", tokenizer=tok)
    save_hf(ret, root / "blip-itm-tiny-coco", kind="retrieval", tokenizer=tok)
    return {"official_captioner": str(root / "model_base_caption_capfilt_large.pth"),
            "official_filter": str(root / "model_base_retrieval_coco.pth"), "vocab": str(root / "vocab.txt"),
            "hf_captioner": str(root / "blip-image-captioning-tiny"), "hf_filter": str(root / "blip-itm-tiny-coco")}


def _set(repo: Path, **sections) -> None:
    path = repo / "byod" / "params.yaml"
    p = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        p.setdefault(section, {}).update(values)
    p["caption"].update(batch_size=8)
    p["filter"].update(batch_size=8)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def _check_clean(repo: Path, web: Path) -> dict:
    clean = repo / "byod" / "data" / "clean"
    inputs = _inputs(web)
    stats = json.loads((repo / "byod" / "metrics" / "clean.json").read_text())
    for source in ("web", "synthetic"):
        s = stats["sources"][source]
        assert s["input"] == len(inputs) and s["kept"] + s["dropped"] == s["input"], (source, s)
    assert stats["sources"]["human"]["input"] == 0

    import webdataset as wds

    tars = sorted(str(p) for p in clean.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"))
    kept = stats["sources"]["web"]["kept"] + stats["sources"]["synthetic"]["kept"]
    assert len(samples) == kept
    by_source = Counter()
    for s in samples:
        meta = s["json"]
        orig = inputs[meta["orig_key"]]  # every kept sample names its original key ...
        assert meta["url"] == orig["url"] and meta["width"] == orig["width"]  # ... and keeps url and metadata
        assert "noise" not in meta  # the generator's hidden label never leaves the evaluation
        assert meta["caption_source"] in ("web", "synthetic") and 0 <= meta["itm"] <= 1
        assert s["txt"] == meta["caption"] and s["jpg"].size == (64, 64)
        if meta["caption_source"] == "web":
            assert meta["caption"] == pre_caption(orig["caption"], PRETRAIN_MAX_WORDS)  # its own text, cleaned
        by_source[meta["caption_source"]] += 1
    assert by_source["web"] == stats["sources"]["web"]["kept"]

    loader = make_loader(str(clean), batch_size=4, image_size=64, train=False, max_words=30)
    assert sum(len(b["text"]) for b in loader) == kept  # our loader reads them as they are
    manifest = [r for p in sorted((clean / "manifest").glob("web-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["key"] for r in manifest) == sorted(inputs)  # one decision per input sample
    assert (repo / "byod" / "plots" / "gallery.png").stat().st_size > 1000
    return stats


def _repo_shards_and_checkpoints(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A project repo, 14 generated web images in two shards, and the released-checkpoint stand-ins
    (their vocabulary from those shards' texts)."""
    repo = make_repo(tmp_path / "repo", variant=None)
    generate(GenerateConfig(web=14, shard_size=7), str(tmp_path / "gen"), splits=("web",), processes=1, progress=False)
    web = tmp_path / "gen" / "web"
    texts = [json.loads(s.fields["json"])["caption"] for t in sorted(web.glob("*.tar"))
             for s in iter_shard_samples(str(t)) if isinstance(s, RawSample)]
    return repo, web, _checkpoints(tmp_path / "checkpoints", build_tokenizer(texts * 5, vocab_size=200))


def test_byod_cleans_generated_and_img2dataset_shards_with_released_checkpoints(tmp_path):
    repo, web, ck = _repo_shards_and_checkpoints(tmp_path)

    # 1. the official .pth pair on the generated shards
    _set(repo, capfilt={"captioner": ck["official_captioner"], "filter": ck["official_filter"]},
         model={"vocab_file": ck["vocab"]}, data={"web": str(web)})
    out = run([sys.executable, "-m", "dvc", "repro", "byod/dvc.yaml"], repo, BLIP_MLFLOW="0").stdout
    assert {"caption", "filter", "assemble"} <= set(re.findall(r"Running stage '(?:byod/dvc.yaml:)?([^']+)'", out))
    first = _check_clean(repo, web)
    assert first["sources"]["synthetic"]["input"] == 14
    lock = yaml.safe_load((repo / "byod" / "dvc.lock").read_text())
    assert {"caption", "filter", "assemble"} <= set(lock["stages"])  # every output versioned

    # 2. the transformers pair on an img2dataset-shaped folder (vocabulary from the folders)
    _img2dataset_folder(web, tmp_path / "laion-like")
    _set(repo, capfilt={"captioner": ck["hf_captioner"], "filter": ck["hf_filter"]}, model={"vocab_file": None},
         data={"web": str(tmp_path / "laion-like")})
    run([sys.executable, "-m", "dvc", "repro", "byod/dvc.yaml"], repo, BLIP_MLFLOW="0")
    second = _check_clean(repo, tmp_path / "laion-like")
    assert second["sources"]["web"]["input"] == 14
    assert (repo / "data").exists() is False  # nothing of the main loop ran


def _clean_samples(repo: Path) -> list[dict]:
    import webdataset as wds

    tars = sorted(str(p) for p in (repo / "byod" / "data" / "clean").glob("*.tar"))
    return [s["json"] for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode()]


def _ran(out: str) -> set[str]:
    """Stages a `dvc repro` log shows run or restored from the run cache (all but "didn't change")."""
    named = set(re.findall(r"[Ss]tage '(?:byod/dvc.yaml:)?([^']+)'", out))
    return named - set(re.findall(r"Stage '(?:byod/dvc.yaml:)?([^']+)' didn't change", out))


def _each_rule_reruns_assemble_alone(repo: Path, n_images: int, threshold: float) -> None:
    """``top_k``, ``fraction``, ``replace`` in turn (then back to ``threshold``): only ``assemble``
    re-runs, and each rule's promise holds on the written shards."""
    for rule, extra in (("top_k", {"top_k": 2}), ("fraction", {"fraction": 0.3}), ("replace", {}),
                        ("threshold", {})):
        _set(repo, assemble={"rule": rule, **extra})
        out = run([sys.executable, "-m", "dvc", "repro", "byod/dvc.yaml"], repo, BLIP_MLFLOW="0").stdout
        assert _ran(out) == {"assemble"}, (rule, out)
        stats = json.loads((repo / "byod" / "metrics" / "clean.json").read_text())
        samples = _clean_samples(repo)
        per_image = Counter(m["orig_key"] for m in samples)
        kept = stats["sources"]["web"]["kept"] + stats["sources"]["synthetic"]["kept"]
        assert stats["rule"]["name"] == rule and len(samples) == kept
        if rule == "top_k":  # web text + up to 4 distinct candidates per image: exactly 2 kept of each
            assert set(per_image.values()) == {2} and len(per_image) == n_images
        elif rule == "fraction":
            assert kept == math.floor(0.3 * stats["rule"]["n_texts"] + 0.5) == stats["rule"]["n_keep"]
        elif rule == "replace":  # one text per image, and a web text only where the filter passed it
            assert max(per_image.values()) == 1
            assert all(m["itm"] >= threshold for m in samples if m["caption_source"] == "web")
        else:
            assert all(m["itm"] >= threshold for m in samples)


def test_byod_with_four_candidates_runs_every_rule_and_a_rule_change_reruns_assemble_alone(tmp_path):
    """Issue 20: ``caption.candidates: 4`` and each ``assemble.rule`` through `dvc repro byod/dvc.yaml`,
    on the generated shards and on an img2dataset-shaped folder; changing only the rule re-runs
    only ``assemble`` (the captions and scores are DVC-cached stage outputs)."""
    repo, web, ck = _repo_shards_and_checkpoints(tmp_path)
    _img2dataset_folder(web, tmp_path / "laion-like")
    for folder in (web, tmp_path / "laion-like"):
        _set(repo, capfilt={"captioner": ck["official_captioner"], "filter": ck["official_filter"],
                            "decoding": "nucleus"},
             model={"vocab_file": ck["vocab"]}, data={"web": str(folder)}, caption={"candidates": 4},
             assemble={"rule": "threshold", "dedup": "none"})
        out = run([sys.executable, "-m", "dvc", "repro", "byod/dvc.yaml"], repo, BLIP_MLFLOW="0").stdout
        assert {"caption", "filter", "assemble"} <= _ran(out), folder
        stats = json.loads((repo / "byod" / "metrics" / "clean.json").read_text())
        assert stats["sources"]["web"]["input"] == 14 and stats["candidates"] == 4
        syn = stats["sources"]["synthetic"]
        assert syn["input"] == 4 * 14 and syn["kept"] + syn["dropped"] == syn["input"]
        assert {m["orig_key"] for m in _clean_samples(repo)} <= set(_inputs(folder))  # the folder's own keys
        _each_rule_reruns_assemble_alone(repo, 14, stats["rule"]["threshold"])


def _plant_copies(web: Path, n: int) -> list[tuple[str, str]]:
    """Give the first ``n`` samples of the second shard the image bytes of the first shard's first
    ``n`` (other keys, urls and texts): exact image duplicates across shards. Returns (copy, original)."""
    first, second = sorted(web.glob("*.tar"))[:2]
    originals = [s for s in iter_shard_samples(str(first)) if isinstance(s, RawSample)][:n]
    with tarfile.open(second) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m, _ in members))[:n]
    swap = {f"{k}.jpg": o.fields["jpg"] for k, o in zip(keys, originals)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, data in members:
            data = swap.get(m.name, data)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    second.write_bytes(buf.getvalue())
    return [(k, o.key) for k, o in zip(keys, originals)]


def test_byod_drops_and_counts_planted_duplicate_images(tmp_path):
    """``assemble.dedup: image`` (byod's default): the later copy of an image is dropped with all
    its texts, counted in ``stats.json`` and named in the manifest with the copy it duplicates."""
    repo, web, ck = _repo_shards_and_checkpoints(tmp_path)
    planted = _plant_copies(web, 2)
    _set(repo, capfilt={"captioner": ck["official_captioner"], "filter": ck["official_filter"]},
         model={"vocab_file": ck["vocab"]}, data={"web": str(web)}, assemble={"dedup": "image"})
    run([sys.executable, "-m", "dvc", "repro", "byod/dvc.yaml"], repo, BLIP_MLFLOW="0")
    stats = json.loads((repo / "byod" / "metrics" / "clean.json").read_text())
    assert stats["dedup"]["n_duplicates"] == 2 and stats["dedup"]["n_groups"] == 2
    for source in ("web", "synthetic"):
        s = stats["sources"][source]
        assert s["input"] == 14 and s["kept"] + s["dropped"] == 14
        assert s["dropped_by"].get("duplicate_image") == 2, (source, s)
    kept_keys = {m["orig_key"] for m in _clean_samples(repo)}
    rows = {r["key"]: r for p in sorted((repo / "byod" / "data" / "clean" / "manifest").glob("web-*.parquet"))
            for r in pq.read_table(p).to_pylist()}
    for copy, original in planted:
        assert copy not in kept_keys
        assert rows[copy]["web"] == "duplicate_image" and rows[copy]["duplicate_of"].endswith(f"/{original}")
        assert rows[original]["duplicate_of"] is None
