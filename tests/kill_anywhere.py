"""Kill anywhere, lose nothing: ``dvc repro`` (smoke params) SIGKILLed inside each long stage —
pre-training, caption, filter, re-pre-training, evaluation — then run again, ends where an
uninterrupted run ends: the same output hashes in ``dvc.lock`` and the same metrics.

Run by ``test_pipeline_dvc`` after its uninterrupted loop, which is the reference (one smoke
run less in CI than a test of its own): :func:`reference` right after that run, then
:func:`kill_each_long_stage_then_finish` in the same folder rebuilt.

What is compared: every cached output's md5 (models, shards, tables, predictions) — bitwise,
since every stage is deterministic on CPU with its seeds (training resumes exactly, CapFilt
commits whole shards); and every metrics file and training curve (``plots/*.csv``) with its
wall-clock fields left out (``seconds``, ``pairs_per_s``...: the only non-deterministic numbers,
which is also why ``dvc.lock`` records other md5s for those files and for the stages that read
them; ``report.md`` quotes them too). Both runs happen in the same folder (one after the other),
so paths recorded in the outputs are equal too.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from pipeline_repo import repo_env, run

VICTIMS = ["pretrain", "caption", "filter", "repretrain", "evaluate@baseline"]
WALL_CLOCK = re.compile(r"(seconds|per_s|_s|wall|time|elapsed|duration)$")
HEADER = re.compile(r"Running stage '([^']+)'")


def _stage_runs(repo: Path, status: str | None = None) -> list[tuple[str, str, int, int | None, str | None]]:
    """(name, status, start ms, end ms, tag ``blip.closed``) of the MLflow child runs of ``dvc
    repro``'s stages, oldest first — read with sqlite3 itself, a fresh read-only connection each
    time: MLflow's client keeps its engine per URI, which would outlive the reference repo deleted
    and rebuilt at this path."""
    con = sqlite3.connect(f"file:{repo / 'mlflow.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT r.name, r.status, r.start_time, r.end_time, c.value FROM runs r JOIN tags t ON "
                           "t.run_uuid = r.run_uuid AND t.key = 'blip.role' AND t.value = 'stage' "
                           "LEFT JOIN tags c ON c.run_uuid = r.run_uuid AND c.key = 'blip.closed' "
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


def reference(repo: Path) -> tuple[tuple[dict, dict], dict[str, float]]:
    """After an uninterrupted ``dvc repro``: its outputs and metrics, and how long each victim's
    command worked (its MLflow child run spans it)."""
    spans = {name: (end - start) / 1000 for name, _, start, end, _ in _stage_runs(repo) if name in VICTIMS}
    return _state(repo), spans


def kill_each_long_stage_then_finish(repo: Path, reference: tuple[dict, dict], spans: dict[str, float]) -> None:
    """In ``repo`` freshly made at the reference's path: ``dvc repro`` SIGKILLed a third of the way
    into each victim's command (before it ends and DVC hashes the outputs, even on a less loaded
    box), a second ``dvc repro`` refused meanwhile, then one run to the end — and every check."""
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
    # KILLED by the rerun (its owner process gone), the rerun's FINISHED
    runs = _stage_runs(repo)
    assert [name for name, status, *_ in runs if status == "RUNNING"] == []
    for stage in VICTIMS:
        statuses = [status for name, status, *_ in runs if name == stage]
        assert statuses == ["KILLED", "FINISHED"], (stage, statuses, kills)
    assert all("gone; closed by" in (closed or "") for _, status, _, _, closed in runs if status == "KILLED")
