"""The caption stage with a real (tiny, random-init) captioner on real shards."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_capfilt import (  # noqa: F401
    QUIET,
    damaged_fixture,
    damaged_results_fixture,
    files_state,
    read_members,
    temporaries,
    tiny_models,
    world_fixture,
)

from blip.capfilt.caption import caption_shards
from blip.capfilt.config import CaptionConfig
from blip.capfilt.models import resolve_device
from blip.capfilt.records import read_record
from blip.checkpoint import save_model
from blip.data.loader import make_loader
from blip.params import ParamsError, build
from blip.track import MemoryTracker

NAMES = ["00000.parquet", "00001.parquet", "00002.parquet"]


def tables(folder) -> dict[str, object]:
    return {n: pq.read_table(os.path.join(folder, n)) for n in NAMES}


def test_one_row_per_sample_including_skipped_ones(damaged, damaged_results):
    caps, _, summary, _ = damaged_results
    assert summary["done"] == 3 and summary["shard_errors"] == {"00002.parquet": "truncated_tar"}
    t = pq.read_table(caps / "00001.parquet").to_pylist()
    assert [r["key"] for r in t] == [k for k, _ in read_members(damaged / "00001.tar")]  # shard order, all 20
    by_key = {r["key"]: r for r in t}
    assert by_key["000010003"]["status"] == "undecodable_image" and by_key["000010003"]["caption"] == ""
    assert by_key["000010005"]["status"] == "missing_image" and by_key["000010005"]["caption"] == ""
    ok = [r for r in t if r["status"] == "ok"]
    assert len(ok) == 18 and all(r["caption"] for r in ok)
    cut = pq.read_table(caps / "00002.parquet").to_pylist()
    assert cut[-1]["status"] == "truncated_tar" and all(r["status"] == "ok" for r in cut[:-1])
    # every sample the loader reads has its caption row: same keys, nothing extra
    loader = make_loader(damaged, batch_size=16, train=False)
    used = {k for b in loader for k in b["key"]}
    rows = {r["key"] for n in NAMES for r in pq.read_table(caps / n).to_pylist() if r["status"] == "ok"}
    assert used == rows and loader.stats.used == len(rows)
    assert summary["status"]["ok"] == len(rows)


def test_a_stage_over_mostly_unusable_input_fails_naming_reasons_and_shards(damaged_results):
    from blip.capfilt.config import check_skipped

    _, _, summary, _ = damaged_results
    bad = sum(v for k, v in summary["status"].items() if k != "ok")
    assert bad >= 3
    check_skipped(summary, 0.2, "caption")  # a few damaged samples: the run goes on
    with pytest.raises(ValueError, match=rf"caption: {bad} of \d+ samples unusable .*top reasons: .*undecodable_image 1"
                                         r".*damaged shards: 00002.parquet \(truncated_tar\).*caption.max_skipped_fraction"):
        check_skipped(summary, 0.01, "caption")


def test_nucleus_captions_do_not_depend_on_batching_or_workers(world, tmp_path):
    ref = tables(world.captions)  # batch 32, one worker
    caption_shards(CaptionConfig(**QUIET, batch_size=3), world.captioner, world.web, tmp_path / "b3")
    caption_shards(CaptionConfig(**QUIET, batch_size=7, workers=2), world.captioner, world.web, tmp_path / "b7w2")
    for folder in ("b3", "b7w2"):
        got = tables(tmp_path / folder)
        for n in NAMES:
            assert got[n].select(["key", "caption", "status"]).equals(ref[n].select(["key", "caption", "status"])), (folder, n)
    captions = [c for t in ref.values() for c in t.column("caption").to_pylist()]
    assert len(set(captions)) == len(captions)  # sampled per image, not one draw for all
    # another seed, other draws
    caption_shards(CaptionConfig(**QUIET, seed=1), world.captioner, world.web, tmp_path / "seed1")
    other = [c for t in tables(tmp_path / "seed1").values() for c in t.column("caption").to_pylist()]
    assert sum(a != b for a, b in zip(captions, other)) > len(captions) // 2


def test_rerun_skips_and_changes_recompute(world, tmp_path):
    out = tmp_path / "caps"
    shutil.copytree(world.captions, out)  # the session's results, made with CaptionConfig(**QUIET)
    before = files_state(out)
    again = caption_shards(CaptionConfig(**QUIET, batch_size=5, workers=2), world.captioner, world.web, out)
    assert (again["done"], again["skipped_existing"], again["rows"]) == (0, 3, 60)  # how it runs is not identity
    assert files_state(out) == before

    beam = caption_shards(CaptionConfig(**QUIET, method="beam"), world.captioner, world.web, out)
    assert beam["done"] == 3 and all(files_state(out)[n] != before[n] for n in NAMES)
    assert tables(out)["00000.parquet"].column("caption").to_pylist() != \
        tables(world.captions)["00000.parquet"].column("caption").to_pylist()
    assert caption_shards(CaptionConfig(**QUIET, method="beam", seed=5), world.captioner, world.web, out)["done"] == 0

    retrained = tmp_path / "retrained"  # same architecture, other weights: other captions
    save_model(tiny_models(world.tokenizer, seed=1)[0], retrained, tokenizer=world.tokenizer)
    assert caption_shards(CaptionConfig(**QUIET, method="beam"), retrained, world.web, out)["done"] == 3


class CrashAfterFirstShard(MemoryTracker):
    """The run dies right after the first shard is committed (an OOM kill, a pre-empted node)."""

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        if metrics.get("caption/shards_done") == 1:
            raise SystemExit("node pre-empted")


def test_crash_mid_run_keeps_finished_shards_and_rerun_completes_the_rest(world, tmp_path):
    out = tmp_path / "caps"
    with pytest.raises(SystemExit):
        caption_shards(CaptionConfig(**QUIET), world.captioner, world.web, out, tracker=CrashAfterFirstShard())
    assert os.listdir(out) == ["00000.parquet"] and read_record(out / "00000.parquet")["rows"] == 20
    first = files_state(out)
    tracker = MemoryTracker()
    resumed = caption_shards(CaptionConfig(**QUIET), world.captioner, world.web, out, tracker=tracker)
    assert (resumed["done"], resumed["skipped_existing"]) == (2, 1)
    assert files_state(out)["00000.parquet"] == first["00000.parquet"] and temporaries(out) == []
    for n, t in tables(world.captions).items():  # identical to an uninterrupted run
        assert pq.read_table(out / n).equals(t)
    assert tracker.params["caption.method"] == "nucleus" and tracker.history("caption/shards_done") == [1, 2]


def test_config_and_device_checks(world, tmp_path):
    assert build(CaptionConfig, {"method": "beam", "num_beams": 3}, "caption").generation().num_beams == 3
    nucleus = CaptionConfig().generation()
    assert (nucleus.method, nucleus.top_p, nucleus.repetition_penalty, nucleus.max_length, nucleus.min_length) == \
        ("nucleus", 0.9, 1.1, 20, 5)
    # repetition_penalty: None keeps BLIP's per method; a value replaces it for both, and is identity
    assert CaptionConfig(method="beam").generation().repetition_penalty == 1.0
    for method in ("beam", "nucleus"):
        rep = CaptionConfig(method=method, repetition_penalty=1.5)
        assert rep.generation().repetition_penalty == 1.5
        assert rep.identity() != CaptionConfig(method=method).identity()
    with pytest.raises(ValueError, match="repetition_penalty=0.0 must be > 0"):
        CaptionConfig(repetition_penalty=0.0)
    with pytest.raises(ParamsError, match="caption.temperature"):
        build(CaptionConfig, {"temperature": 1.0}, "caption")
    with pytest.raises(ParamsError, match="method='greedy'"):
        build(CaptionConfig, {"method": "greedy"}, "caption")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            caption_shards(CaptionConfig(progress=False, device="cuda"), world.captioner, world.web, tmp_path / "x")
    with pytest.raises(ValueError, match="BlipRetrieval, which has no text decoder"):
        caption_shards(CaptionConfig(**QUIET), world.filter, world.web, tmp_path / "y")


def test_a_real_caption_run_after_a_skipped_one_drops_the_skip_marker(world, tmp_path):
    """The captions folder persists between runs (dvc.yaml), so a `capfilt.parts=filter` run's
    SKIPPED marker must not survive a later run that captions: the filter would read it as
    "no captions" and score no synthetic texts."""
    from blip import params as params_module
    from blip.stages.capfilt import caption
    from blip.stages.common import skipped
    from blip.stages.registry import STAGES

    out = tmp_path / "captions"
    quiet = {f"caption.{k}": v for k, v in QUIET.items()}
    for parts in ("filter", "both"):
        raw = params_module.apply_overrides(params_module.read(), {"capfilt.parts": parts, **quiet})
        p = params_module.from_dict(raw)
        caption(STAGES["caption"], p, MemoryTracker(), captioner=str(world.captioner), shards=[str(world.web)],
                out=str(out))
        assert skipped(out) is (parts == "filter")
    assert sorted(f.name for f in out.glob("*.parquet")) == NAMES
