"""``blip.atomic``: a file or folder appears whole or not at all, and what a killed run left is
cleared — but never what a run that still works is writing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blip.atomic import atomic_dir, atomic_path, remove_stale_tmp, write_bytes_atomic


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(p.stdout)


def test_a_file_is_renamed_in_on_success_and_its_temporary_removed_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_bytes_atomic(target, b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and f".tmp-{os.getpid()}-" in tmp
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.json"]


def test_a_folder_is_swapped_in_whole_and_left_as_it_was_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v2, half")
        raise OSError(28, "No space left on device")
    assert [p.name for p in out.iterdir()] == ["weights"] and (out / "weights").read_text() == "v1"
    with atomic_dir(out) as tmp:
        (tmp / "other").write_text("v3")
    assert [p.name for p in out.iterdir()] == ["other"]  # the previous folder is replaced, not merged
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_symlinked_folder_stays_a_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    with atomic_dir(link) as tmp:
        (tmp / "f").write_text("x")
    assert link.is_symlink() and (real / "f").read_text() == "x"
    with pytest.raises(FileExistsError, match="not a folder"), atomic_dir(real / "f"):
        pass


def test_leftovers_of_dead_writers_are_cleared_those_of_live_ones_kept(tmp_path):
    target = tmp_path / "00001.parquet"
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f"00001.parquet.tmp-{dead}-7").write_bytes(b"half")
    (tmp_path / f"00001.parquet.tmp-{dead}").mkdir()  # a folder, named without a thread
    (tmp_path / f"00001.parquet.tmp-{live}-7").write_bytes(b"still being written")
    (tmp_path / f"00002.parquet.tmp-{dead}-7").write_bytes(b"another result's: not ours to clear")
    remove_stale_tmp(target)
    assert sorted(os.listdir(tmp_path)) == [f"00001.parquet.tmp-{live}-7", f"00002.parquet.tmp-{dead}-7"]


def test_a_folder_renamed_aside_by_a_run_killed_between_its_renames_is_put_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f"out.old-{dead_pid()}-1"
    aside.mkdir()
    (aside / "mine.txt").write_text("mine")
    remove_stale_tmp(out)
    assert (out / "mine.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["out"]
