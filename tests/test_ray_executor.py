"""``executor: ray`` with a real local Ray (2 CPUs): the caption and filter tables are the same
bytes as the thread executor's, a worker killed mid-shard costs a retry and no row, a failing
shard is named, and the settings are checked."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402
from capfilt_workers import ByteCounter  # noqa: E402
from fixtures_capfilt import QUIET, world_fixture  # noqa: E402, F401

from blip.capfilt.caption import caption_shards  # noqa: E402
from blip.capfilt.config import AssembleConfig, CaptionConfig, FilterConfig  # noqa: E402
from blip.capfilt.filter import score_shards  # noqa: E402
from blip.capfilt.fingerprint import file_fingerprint  # noqa: E402
from blip.capfilt.ray_executor import RayOptions  # noqa: E402
from blip.capfilt.records import read_record  # noqa: E402
from blip.capfilt.shardwork import result_name, run_shards, shard_tasks  # noqa: E402
from blip.data.shards import resolve_shards  # noqa: E402
from blip.params import ComputeParams  # noqa: E402

RAY = RayOptions(num_cpus=1, num_gpus="auto", max_retries=2)


class DiesOnce:
    """Wraps a worker; the first time it meets shard ``victim`` its process exits mid-shard (as
    an OOM kill would), leaving a marker so the retry lives. ``always``: dies every time."""

    def __init__(self, inner, victim: str, marker: str, always: bool = False):
        self.inner, self.victim, self.marker, self.always = inner(), victim, marker, always

    def __call__(self, task):
        if os.path.basename(task.url) == self.victim and (self.always or not os.path.exists(self.marker)):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(137)
        return self.inner(task)


class BrokenFactory:
    def __call__(self):
        raise FileNotFoundError("/nowhere/captioner: no such checkpoint")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for module in (__name__, "capfilt_workers"):  # test-only workers travel by value (tests/ is not installed)
        ray.cloudpickle.register_pickle_by_value(sys.modules[module])
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def count_tasks(shards):
    return shard_tasks(resolve_shards(shards), result_name, lambda u: {"shard": file_fingerprint(u)})


def test_caption_and_filter_tables_byte_identical_to_the_thread_executor(world, tmp_path):
    torch.set_num_threads(1)  # the Ray actors' torch threads (num_cpus=1): the same kernels
    thread_caps, ray_caps = tmp_path / "thread-captions", tmp_path / "ray-captions"
    caption_shards(CaptionConfig(**QUIET, workers=2), world.captioner, world.web, thread_caps)
    s = caption_shards(CaptionConfig(**QUIET, workers=2, executor="ray"), world.captioner, world.web, ray_caps, ray=RAY)
    assert s["done"] == 3 and s["rows"] == 60
    assert files(ray_caps) == files(thread_caps)

    thread_scores, ray_scores = tmp_path / "thread-scores", tmp_path / "ray-scores"
    score_shards(FilterConfig(**QUIET, workers=2), world.filter, world.web, thread_caps, thread_scores)
    s = score_shards(FilterConfig(**QUIET, workers=2, executor="ray"), world.filter, world.web, ray_caps, ray_scores,
                     ray=RAY)
    assert s["done"] == 3 and s["rows"] == 60
    assert files(ray_scores) == files(thread_scores)
    # a rerun with Ray finds every shard valid and starts no actor
    again = score_shards(FilterConfig(**QUIET, workers=2, executor="ray"), world.filter, world.web, ray_caps, ray_scores,
                         ray=RAY)
    assert again["done"] == 0 and again["skipped_existing"] == 3


def test_a_worker_killed_mid_shard_is_replaced_and_the_shard_retried(world, tmp_path):
    reference = run_shards("count", count_tasks(world.web), tmp_path / "thread", ByteCounter, "h1")
    marker = tmp_path / "died"
    factory = partial(DiesOnce, ByteCounter, "00001.tar", str(marker))
    s = run_shards("count", count_tasks(world.web), tmp_path / "ray", factory, "h1", workers=2, executor="ray", ray=RAY)
    assert marker.exists(), "the worker never died: the test did not test the retry"
    assert s["done"] == 3 and s["rows"] == reference["rows"] == 60 and s["status"] == reference["status"]
    assert files(tmp_path / "ray") == files(tmp_path / "thread")  # no row lost or doubled
    assert not [n for n in os.listdir(tmp_path / "ray") if ".tmp" in n]


def test_a_shard_whose_worker_always_dies_fails_by_name_after_its_retries(world, tmp_path):
    factory = partial(DiesOnce, ByteCounter, "00001.tar", str(tmp_path / "died"), always=True)
    out = tmp_path / "ray"
    with pytest.raises(RuntimeError, match=r"00001\.tar.*died 3 times"):
        run_shards("count", count_tasks(world.web), out, factory, "h1", workers=1, executor="ray", ray=RAY)
    kept = sorted(p.name for p in out.glob("*.parquet"))
    assert "00001.parquet" not in kept and kept  # shards finished before the failure are committed
    assert all(read_record(out / n)["rows"] == 20 for n in kept)


def test_a_failing_shard_is_named_and_finished_shards_are_kept(world, tmp_path):
    out = tmp_path / "ray"
    with pytest.raises(RuntimeError, match=r"00002\.tar failed \(RuntimeError: injected crash\)"):
        run_shards("count", count_tasks(world.web), out, partial(ByteCounter, "00002.tar"), "h1", workers=1,
                   executor="ray", ray=RAY)
    assert (out / "00000.parquet").exists() and not (out / "00002.parquet").exists()
    # the rerun (the bad shard mended) completes only what is missing
    s = run_shards("count", count_tasks(world.web), out, ByteCounter, "h1", workers=2, executor="ray", ray=RAY)
    assert s["done"] == 3 - s["skipped_existing"] and s["rows"] == 60


def test_a_worker_that_cannot_start_is_a_clear_error(world, tmp_path):
    with pytest.raises(RuntimeError, match="could not start.*no such checkpoint"):
        run_shards("count", count_tasks(world.web), tmp_path / "o", BrokenFactory(), "h1", workers=1, executor="ray",
                   ray=RAY)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="ray num_gpus"):
        ComputeParams(ray_gpus_per_worker="many")
    with pytest.raises(ValueError, match="ray num_cpus"):
        ComputeParams(ray_cpus_per_worker=0)
    with pytest.raises(ValueError, match="assemble.executor=ray"):
        AssembleConfig(executor="ray")
    assert ComputeParams().ray() == RayOptions()


def test_workers_read_shard_urls_the_same_as_paths(world, tmp_path):
    """Inputs as webdataset URLs (``pipe:``: what an S3/HTTP source looks like to the reader):
    the same rows, captions and result names as from the paths."""
    import pyarrow.parquet as pq

    torch.set_num_threads(1)
    urls = [f"pipe:cat {u}" for u in resolve_shards(world.web)]
    local, remote = tmp_path / "local", tmp_path / "remote"
    caption_shards(CaptionConfig(**QUIET), world.captioner, world.web, local)
    s = caption_shards(CaptionConfig(**QUIET, workers=2, executor="ray"), world.captioner, urls, remote, ray=RAY)
    assert s["rows"] == 60 and sorted(files(remote)) == sorted(files(local))
    for name in files(local):
        assert pq.read_table(remote / name).equals(pq.read_table(local / name))
        assert read_record(remote / name)["inputs"]["shard"].startswith("url:pipe:cat ")
