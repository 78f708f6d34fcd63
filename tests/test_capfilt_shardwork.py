"""The shard worker pattern on its own: idempotent skips, recomputation on change, atomic commits,
crash recovery and fan-out, with a real (model-free) worker over real tar shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial

import pyarrow.parquet as pq
import pytest
from capfilt_workers import ByteCounter
from fixtures_capfilt import (  # noqa: F401
    damaged_fixture,
    files_state,
    read_members,
    temporaries,
    world_fixture,
    write_members,
)

from blip.capfilt import records
from blip.capfilt.fingerprint import file_fingerprint
from blip.capfilt.records import read_record
from blip.capfilt.shardwork import result_name, run_shards, shard_tasks
from blip.data.shards import resolve_shards


def run(shards, out, cfg_hash="h1", workers=1, executor="thread", fail_on=None):
    urls = resolve_shards(shards)
    tasks = shard_tasks(urls, result_name, lambda u: {"shard": file_fingerprint(u)})
    return run_shards("count", tasks, out, partial(ByteCounter, fail_on), cfg_hash, workers=workers, executor=executor)


@pytest.fixture
def web(world, tmp_path):
    d = tmp_path / "web"
    shutil.copytree(world.web, d)
    return d


def test_rerun_skips_valid_results_and_changes_recompute(web, tmp_path):
    out = tmp_path / "out"
    first = run(web, out)
    assert (first["done"], first["skipped_existing"], first["rows"], first["status"]) == (3, 0, 60, {"ok": 60})
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    before = files_state(out)

    again = run(web, out)
    assert (again["done"], again["skipped_existing"], again["rows"], again["status"]) == (0, 3, 60, {"ok": 60})
    assert files_state(out) == before  # not rewritten: same inode, same mtime

    changed = run(web, out, cfg_hash="h2")  # config change: everything redone
    assert changed["done"] == 3 and all(files_state(out)[n] != before[n] for n in before)

    # an input shard replaced by other content (same name, same count): only that shard is redone
    state = files_state(out)
    samples = read_members(web / "00001.tar")
    samples[0], samples[1] = (samples[0][0], samples[1][1]), (samples[1][0], samples[0][1])
    write_members(web, 1, samples, 20)
    redo = run(web, out, cfg_hash="h2")
    assert redo["done"] == 1 and redo["skipped_existing"] == 2
    now = files_state(out)
    assert now["00001.parquet"] != state["00001.parquet"]
    assert now["00000.parquet"] == state["00000.parquet"] and now["00002.parquet"] == state["00002.parquet"]


def test_record_in_footer_and_one_row_per_sample(web, tmp_path):
    out = tmp_path / "out"
    run(web, out)
    rec = read_record(out / "00001.parquet")
    assert rec["stage"] == "count" and rec["config_hash"] == "h1" and rec["rows"] == rec["expected_rows"] == 20
    assert rec["inputs"] == {"shard": file_fingerprint(web / "00001.tar")} and rec["status"] == {"ok": 20}
    keys = pq.read_table(out / "00001.parquet").column("key").to_pylist()
    assert keys == [k for k, _ in read_members(web / "00001.tar")]


def test_crash_on_second_shard_keeps_finished_ones_and_rerun_completes(web, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="00001.tar failed.*injected crash"):
        run(web, out, fail_on="00001.tar")
    assert sorted(os.listdir(out)) == ["00000.parquet"]  # no partial or temporary files
    assert read_record(out / "00000.parquet")["rows"] == 20
    done = files_state(out)
    resumed = run(web, out)
    assert (resumed["done"], resumed["skipped_existing"]) == (2, 1)
    assert files_state(out)["00000.parquet"] == done["00000.parquet"]
    reference = run(web, tmp_path / "ref")
    for name in ("00000.parquet", "00001.parquet", "00002.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / "ref" / name))
    assert reference["rows"] == resumed["rows"] == 60


def test_crash_while_writing_leaves_no_partial_file(web, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write, calls = pq.write_table, []

    def write_then_die(table, where, **kw):  # the process dies after bytes hit the temporary file
        calls.append(where)
        real_write(table, where, **kw)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(records.pq, "write_table", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(web, out)
    monkeypatch.undo()
    assert ".tmp-" in os.path.basename(calls[1]) and os.path.dirname(calls[1]) == str(out)
    assert sorted(os.listdir(out)) == ["00000.parquet"]
    # a temporary left by a SIGKILL-ed run, and a result cut in half by a dying disk
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (out / f"00001.parquet.tmp-{int(dead.stdout)}-1").write_bytes(b"PAR1 half a table")
    data = (out / "00000.parquet").read_bytes()
    (out / "00000.parquet").write_bytes(data[: len(data) // 2])
    resumed = run(web, out)
    assert resumed["done"] == 3 and temporaries(out) == []
    assert all(read_record(out / n)["rows"] == 20 for n in os.listdir(out))


def test_damaged_input_one_row_per_sample_read_and_valid_on_rerun(damaged, tmp_path):
    out = tmp_path / "out"
    s = run(damaged, out)
    assert s["shard_errors"] == {"00002.parquet": "truncated_tar"}
    t1 = pq.read_table(out / "00001.parquet")
    assert t1.num_rows == 20
    status = dict(zip(t1.column("key").to_pylist(), t1.column("status").to_pylist()))
    assert status["000010003"] == "undecodable_image" and status["000010005"] == "missing_image"
    assert sum(v == "ok" for v in status.values()) == 18
    t2 = pq.read_table(out / "00002.parquet")
    assert 0 < t2.num_rows < 20 and t2.column("status").to_pylist()[-1] == "truncated_tar"
    assert run(damaged, out)["skipped_existing"] == 3  # a damaged input is not retried forever


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_pool_gives_the_same_results_as_sequential(web, tmp_path, executor):
    seq = run(web, tmp_path / "seq")
    par = run(web, tmp_path / "par", workers=2, executor=executor)
    assert (par["done"], par["rows"], par["status"]) == (3, seq["rows"], seq["status"])
    for name in os.listdir(tmp_path / "seq"):
        assert pq.read_table(tmp_path / "par" / name).equals(pq.read_table(tmp_path / "seq" / name))


def test_pool_crash_keeps_finished_shards(web, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="00002.tar failed"):
        run(web, out, workers=2, fail_on="00002.tar")
    assert "00002.parquet" not in os.listdir(out) and temporaries(out) == []
    resumed = run(web, out, workers=2)
    assert resumed["done"] == 3 - resumed["skipped_existing"] and resumed["rows"] == 60


def test_actionable_errors(web, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(web, other)
    with pytest.raises(ValueError, match="would both write 00000.parquet"):
        run([str(web / "00000.tar"), str(other / "00000.tar")], tmp_path / "out")
    # metadata that disagrees with the tar (a stale _stats.json) is named, not silently trusted
    write_members(web, 0, read_members(web / "00000.tar")[:15], 20)
    with pytest.raises(RuntimeError, match="says 20 samples but 15 were read"):
        run(web / "00000.tar", tmp_path / "out2")
    with pytest.raises(ValueError, match="executor"):
        run(web, tmp_path / "out3", workers=2, executor="fork")


def test_result_names_from_paths_and_urls():
    from blip.data.shards import is_local, shard_file_name

    assert result_name("/d/web/00003.tar") == "00003.parquet"
    assert result_name("s3://bucket/web/00003.tar?versionId=2") == "00003.parquet"
    assert result_name("pipe:aws s3 cp s3://bucket/web/00003.tar -") == "00003.parquet"
    assert result_name("https://host/web/00003.tar.gz") == "00003.parquet"
    assert shard_file_name("pipe:curl -s -L https://host/a/00007.tgz") == "00007.tgz"
    assert is_local("/d/00003.tar") and not is_local("pipe:cat x.tar") and not is_local("gs://b/x.tar")
    with pytest.raises(ValueError, match="must name its .tar file"):
        result_name("pipe:my-shard-server --next")
