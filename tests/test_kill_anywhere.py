"""Kill anywhere, lose nothing: ``dvc repro`` (smoke params) SIGKILLed inside each long stage —
pre-training, caption, filter, re-pre-training, evaluation — then run again, ends where an
uninterrupted run ends: the same output hashes in ``dvc.lock`` and the same metrics.

What is compared: every cached output's md5 (models, shards, tables, predictions) — bitwise,
since every stage is deterministic on CPU with its seeds (training resumes exactly, CapFilt
commits whole shards); and every metrics file and training curve (``plots/*.csv``) with its
wall-clock fields left out (``seconds``, ``pairs_per_s``...: the only non-deterministic numbers,
which is also why ``dvc.lock`` records other md5s for those files and for the stages that read
them; ``report.md`` quotes them too). Both runs happen in the same
folder (one after the other), so paths recorded in the outputs are equal too.

About 2 smoke runs of wall time (~4-6 min on 2 cores), marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pipeline_repo import make_repo, repo_env, run

pytestmark = [pytest.mark.slow, pytest.mark.pipeline]

VICTIMS = ["pretrain", "caption", "filter", "repretrain", "evaluate@baseline"]
WALL_CLOCK = re.compile(r"(seconds|per_s|_s|wall|time|elapsed|duration)$")
HEADER = re.compile(r"Running stage '([^']+)'")


def _stage_runs(repo: Path, status: str | None = None) -> list[tuple[str, str, int, int | None]]:
    """(name, status, start ms, end ms) of the MLflow child runs of ``dvc repro``'s stages, oldest
    first — read with sqlite3 itself, a fresh read-only connection each time: MLflow's client keeps
    its engine per URI, which would outlive the reference repo deleted and rebuilt at this path."""
    con = sqlite3.connect(f"file:{repo / 'mlflow.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT r.name, r.status, r.start_time, r.end_time FROM runs r JOIN tags t ON "
                           "t.run_uuid = r.run_uuid AND t.key = 'blip.role' AND t.value = 'stage' "
                           "ORDER BY r.start_time").fetchall()
    finally:
        con.close()
    return [r for r in rows if status is None or r[1] == status]


def _repro(repo: Path, kill_in: str | None = None, after: float = 0.0, meanwhile=None) -> tuple[int, str]:
    """``dvc repro`` in its own session; with ``kill_in``, SIGKILL the whole session ``after``
    seconds after that stage's command opened its MLflow child run — so the kill lands inside the
    command's work, whatever the interpreter's start-up costs on a loaded box (``meanwhile()`` is
    called first, while the stage runs). Returns (exit code, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=repo_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    started: set[str] = set()
    killed = threading.Event()

    def kill_later(since: float) -> None:
        while proc.poll() is None:
            mine = [r for r in _stage_runs(repo, "RUNNING") if r[0] == kill_in and r[2] >= since * 1000]
            if mine:
                time.sleep(max(0.0, mine[0][2] / 1000 + after - time.time()))
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # dvc, the stage command and its children: an OOM kill or a power cut
                    killed.set()
                return
            time.sleep(0.2)

    for line in proc.stdout:
        lines.append(line)
        m = HEADER.search(line)
        if m:
            started.add(m.group(1))
            if m.group(1) == kill_in:
                threading.Thread(target=kill_later, args=(time.time() - 1,), daemon=True).start()
                if meanwhile is not None:
                    meanwhile()
    rc = proc.wait()
    if kill_in is not None:
        assert kill_in in started, f"stage {kill_in} never started:\n{''.join(lines[-40:])}"
        assert killed.is_set() and rc != 0, f"{kill_in} finished before the kill ({after:.1f} s into its run)"
    return rc, "".join(lines)


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not WALL_CLOCK.search(k)}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _state(repo: Path) -> tuple[dict, dict]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    metrics_files = {o["path"] for s in lock["stages"].values() for o in s.get("outs", [])
                     if o["path"].startswith("metrics/")}
    plots = {o["path"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"].endswith(".csv")}
    outs = {o["path"]: o.get("md5") for s in lock["stages"].values() for o in s.get("outs", [])
            if o["path"] not in metrics_files | plots and o["path"] != "report.md"}
    metrics = {p: _strip(json.loads((repo / p).read_text())) for p in sorted(metrics_files)}
    for p in sorted(plots):  # training curves: every column but throughput
        rows = list(csv.DictReader((repo / p).open()))
        metrics[p] = [_strip(r) for r in rows]
    return outs, metrics


def test_dvc_repro_killed_inside_each_long_stage_ends_as_an_uninterrupted_run(tmp_path):
    repo = tmp_path / "repo"
    make_repo(repo)
    rc, out = _repro(repo)
    assert rc == 0, out[-4000:]
    reference = _state(repo)
    # how long each victim's command worked (its MLflow child run spans it): the kill lands a third
    # of the way in, before the command ends and DVC hashes the outputs even on a less loaded box
    spans = {name: (end - start) / 1000 for name, _, start, end in _stage_runs(repo)}
    shutil.rmtree(repo)

    make_repo(repo)
    second: list[subprocess.CompletedProcess] = []

    def second_repro() -> None:  # two writers on one workspace: DVC's locks turn the second away
        second.append(run([sys.executable, "-m", "dvc", "repro"], repo, check=False, timeout=120))

    kills = []
    for i, stage in enumerate(VICTIMS):
        after = spans[stage] / 3
        rc, out = _repro(repo, kill_in=stage, after=after, meanwhile=second_repro if i == 0 else None)
        kills.append((stage, round(after, 1)))
    said = second[0].stdout + second[0].stderr  # DVC's rwlock: "'<out>' is busy, it is being blocked by: (PID ...)"
    assert second[0].returncode != 0 and "is busy" in said and "blocked by" in said, said
    rc, out = _repro(repo)
    assert rc == 0, out[-4000:]
    assert not list((repo / "models").glob("*.resume")), "a resume folder outlived its finished stage"

    outs, metrics = _state(repo)
    diff = {p: (reference[0].get(p), h) for p, h in outs.items() if reference[0].get(p) != h}
    assert diff == {}, f"outputs differ after kills {kills}: {diff}"
    assert outs.keys() == reference[0].keys()
    for path, m in metrics.items():
        assert m == reference[1][path], f"{path} differs after kills {kills}"
    # nothing left for DVC to do, and no temporaries left beside the CapFilt tables
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo).stdout)
    assert status == {}, status
    assert not [p for p in (repo / "data" / "capfilt").rglob("*.tmp-*")]

    # MLflow: nothing stays RUNNING; each victim ran twice, the killed attempt's child run closed
    # KILLED by the rerun (its owner process gone), the rerun's FINISHED. MLflow's first use in this
    # process, so no engine of the deleted reference store is reused
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`blip.role` = 'stage'", order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    for stage in VICTIMS:
        statuses = [r.info.status for r in runs if r.info.run_name == stage]
        assert statuses == ["KILLED", "FINISHED"], (stage, statuses, kills)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert all("gone; closed by" in r.data.tags.get("blip.closed", "") for r in killed)
