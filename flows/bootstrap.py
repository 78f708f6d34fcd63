"""The bootstrap as a Prefect flow: one task per DVC stage, in the order of DVC's graph.

DVC owns what is up to date (``dvc.yaml`` + ``dvc.lock``); Prefect owns when, where and how often.
Each stage task runs ``dvc repro --single-item <stage>`` in the workspace, so a task whose inputs
did not change is a cheap no-op and ``dvc.lock`` always records what ran. Deployment parameters
never bypass DVC: ``params``/``variant`` are written into ``params.yaml`` for the run (through
``blip.params``), so DVC records them in ``dvc.lock`` like any hand edit — and the file is put
back as it was when the run ends, however it ends, so a run never changes what the next plain run
does (a run killed before it could restore is undone by the next run, ``run_params``). The
parameterised run's outputs stay in DVC's run cache and in MLflow.

One flow run = one MLflow parent run (``blip.pipeline.tracking``): the flow creates it, tags it
with the Prefect flow run, hands its id to the stage processes in ``BLIP_MLFLOW_PARENT_RUN_ID``
(each executed stage logs a child run under it), and ends it FINISHED or FAILED.

Concurrency: DVC holds one lock per workspace, so stages run one at a time, and a flow run holds
the workspace's ``.blip-flow.lock`` from its first params edit to its last stage: a second flow
run in the same checkout fails at once naming the holder (``serve`` uses ``limit=1``; a work pool
needs a concurrency limit of 1 per checkout). A flow run that is cancelled or crashes ends its
MLflow parent KILLED or FAILED (state hooks); one killed outright is closed by the next run. The parallel work — CapFilt shards — happens *inside* the caption/filter stage
commands (``caption.workers``/``caption.executor``, ``filter.workers``/``filter.executor`` in
``params.yaml``); those outputs are ``persist: true`` with one atomic result per shard, so a task
retry redoes only the shards that are missing.

Settings (environment):
  ``BLIP_ROOT``         workspace to run in (default: the repository holding this file); the
                        ``root`` parameter overrides it.
  ``BLIP_TASK_RUNNER``  the flow's task runner; ``thread`` (default, the only one):
                        ``ThreadPoolTaskRunner(max_workers=1)``, since DVC serializes stages anyway.

Usage::

  python flows/bootstrap.py serve                       # deployment bootstrap/full, runs here
  prefect deployment run bootstrap/full --watch --params '{"params": {"capfilt.decoding": "beam"}}'
  python flows/bootstrap.py run --variant smoke --set capfilt.decoding=beam   # no deployment
  prefect deploy --all                                  # prefect.yaml: work pool blip-gpu
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from blip import params as params_module
from blip.evaluate.report import flatten
from blip.pipeline import tracking

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 30  # output lines quoted in the error of a failed stage


def workspace(root: str | Path | None = None) -> Path:
    """The workspace to run in: ``root``, else ``$BLIP_ROOT``, else this repository."""
    return Path(root or os.environ.get("BLIP_ROOT") or REPO).resolve()


def task_runner() -> ThreadPoolTaskRunner:
    kind = os.environ.get("BLIP_TASK_RUNNER", "thread")
    if kind != "thread":
        raise ValueError(f"BLIP_TASK_RUNNER={kind!r}: only 'thread' is supported (DVC runs one stage at a time)")
    return ThreadPoolTaskRunner(max_workers=1)


def _address(stage, root_dir: str) -> str:
    """How ``dvc repro`` run in ``root_dir`` names the stage (``Stage.addressing`` is relative to
    the current directory): ``name`` for the top ``dvc.yaml``, else ``sub/dvc.yaml:name``."""
    dvcfile = os.path.relpath(stage.path, root_dir)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def stage_order(root: Path, only: list[str] | None = None, pipeline: str = "dvc.yaml") -> list[str]:
    """Stages of the pipeline ``root/pipeline`` (``dvc.yaml``; ``byod/dvc.yaml`` for bring-your-own-
    data CapFilt) in dependency order (ties in file order), restricted to ``only`` if given. A
    foreach group name (``evaluate``) selects all its items (``evaluate@baseline``, ...). Only the
    named stages are returned — not their upstream. Names are as ``dvc repro`` in ``root`` takes
    them (``byod/dvc.yaml:caption``); ``only`` may use the bare names."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:  # closed before any stage runs: one DVC lock per workspace
        dvcfile = os.path.normpath(os.path.join(repo.root_dir, pipeline))
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage) and os.path.normpath(s.path) == dvcfile]
        if not stages:
            raise ValueError(f"no pipeline stages in {dvcfile}")
        name = {s: _address(s, repo.root_dir) for s in stages}
        graph = nx.DiGraph()
        graph.add_nodes_from(name.values())
        # DVC's edges point from a stage to the stages it depends on; run dependencies first.
        graph.add_edges_from((name[b], name[a]) for a, b in repo.index.graph.edges if a in name and b in name)
    position = {n: i for i, n in enumerate(name.values())}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    if not only:
        return order
    wanted: set[str] = set()
    for want in only:
        hits = [n for n in order if n.rsplit(":", 1)[-1] == want or n == want
                or n.rsplit(":", 1)[-1].startswith(f"{want}@")]
        if not hits:
            raise ValueError(f"stage {want!r} is not in {root / pipeline}; stages: {', '.join(order)}")
        wanted.update(hits)
    return [n for n in order if n in wanted]


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """Environment of a stage process: this interpreter's bin dir first on PATH (stage commands
    call ``python -m blip ...``), no DVC analytics, unbuffered output, the MLflow parent run."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if parent_run_id:
        env["BLIP_MLFLOW_PARENT_RUN_ID"] = parent_run_id
    else:
        env.pop("BLIP_MLFLOW_PARENT_RUN_ID", None)
    return env


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=[5, 30], cache_policy=NONE)
def run_stage(stage: str, root: str, force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` in ``root``, its output streamed to the run log.
    Returns ``{"stage", "ran": False}`` when DVC found the stage up to date (plus
    ``"restored": True`` when it checked the outputs out of its run cache instead of running the
    command), else ``{"stage", "ran": True, "seconds"}``; raises ``RuntimeError`` with the output's tail on failure."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    logger.info("$ %s", " ".join(["dvc", *cmd[3:]]))
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    ran = restored = False
    proc = subprocess.Popen(cmd, cwd=root, env=stage_env(parent_run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        # progress bars redraw with "\r": keep only the last state of each line
        line = raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
        if not line:
            continue
        tail.append(line)
        ran = ran or line.startswith(f"Running stage '{stage}'")
        restored = restored or line.startswith(f"Stage '{stage}' is cached")  # DVC's run cache
        (logger.error if line.startswith("ERROR") else logger.info)(line)
    rc = proc.wait()
    seconds = round(time.monotonic() - start, 2)
    if rc != 0:
        raise RuntimeError(f"dvc repro {stage} failed (exit {rc}) after {seconds} s; last output:\n" + "\n".join(tail))
    if not ran:
        return {"stage": stage, "ran": False, **({"restored": True} if restored else {})}
    return {"stage": stage, "ran": True, "seconds": seconds}


def _number(value: Any) -> float | int | None:
    """A finite int/float (rounded for display), else None: a table cell must be valid JSON."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value if isinstance(value, int) else round(value, 4)


def results_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per numeric metric of ``report.json``: baseline, capfilt and their difference."""
    base, capfilt = flatten(report.get("baseline") or {}), flatten(report.get("capfilt") or {})
    rows = []
    for metric in dict.fromkeys([*base, *capfilt]):
        b, c = _number(base.get(metric)), _number(capfilt.get(metric))
        if b is None and c is None:
            continue  # notes such as "test/tokenizer" or the reasons a metric was skipped
        delta = round(c - b, 4) if b is not None and c is not None else None
        rows.append({"metric": metric, "baseline": b, "capfilt": c, "delta": delta})
    return rows


def inline_images(markdown: str, root: Path, limit: int = 2 << 20) -> str:
    """``![alt](path.png)`` → a data URI, so the Prefect UI shows the picture (e.g. the CapFilt
    gallery) without access to the workspace; images over ``limit`` bytes or missing stay links."""
    import base64
    import re

    def inline(m: re.Match) -> str:
        path = root / m.group(2)
        if not path.is_file() or path.suffix.lower() != ".png" or path.stat().st_size > limit:
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, markdown)


def publish_clean(root: Path) -> None:
    """Prefect artifacts of a bring-your-own-data run: what was kept and dropped per source, and the
    gallery."""
    stats = json.loads((root / "metrics" / "clean.json").read_text())
    rows = [{"source": s, **{k: v.get(k) for k in ("input", "kept", "dropped")},
             "dropped_by": json.dumps(v.get("dropped_by") or {})}
            for s, v in (stats.get("sources") or {}).items() if isinstance(v, dict) and v.get("input")]
    create_table_artifact(key="capfilt-clean", table=rows, description="Your web shards after CapFilt: per source")
    gallery = root / "plots" / "gallery.png"
    if gallery.is_file():
        create_markdown_artifact(key="capfilt-gallery", markdown=inline_images("![gallery](plots/gallery.png)", root),
                                 description="Kept (green) and dropped (red) web and synthetic texts")


def publish(root: Path, run_id: str | None, report: bool) -> None:
    """Prefect artifacts: the results table and ``report.md`` (when the report stage was part of
    this run), and a link to the MLflow parent run."""
    results = root / "metrics" / "report.json"
    if report and results.is_file():
        create_table_artifact(key="bootstrap-results", table=results_table(json.loads(results.read_text())),
                              description="Downstream metrics: baseline (pre-trained on noisy web text) vs CapFilt")
    md = root / "report.md"
    if report and md.is_file():
        create_markdown_artifact(key="bootstrap-report", markdown=inline_images(md.read_text(), root),
                                 description="report.md")
    if run_id:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(root, run_id), link_text="MLflow parent run",
                             description="The MLflow run of this bootstrap (one child run per executed stage)")


LOCK_FILE = ".blip-flow.lock"
BACKUP_SUFFIX = ".flow-backup"


@contextmanager
def workspace_lock(home: Path, holder: str) -> Iterator[None]:
    """Hold ``home/.blip-flow.lock`` (an ``flock``: released by the kernel if this process dies) or
    fail at once naming the run that holds it."""
    f = open(home / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(f"{home} is in use by {owner}: one bootstrap run per checkout at a time (DVC locks the "
                           "workspace). Wait for it to finish, cancel it, or run in another checkout") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{holder} (pid {os.getpid()})\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextmanager
def run_params(params_path: Path, variant: str | None, overrides: dict[str, Any] | None) -> Iterator[None]:
    """``params.yaml`` with the run's ``variant``/``overrides`` applied while the block runs, then
    the file as it was (a copy ``params.yaml.flow-backup`` is kept meanwhile; one left by a run
    killed mid-way is restored first — the caller holds the workspace lock, so its run is gone)."""
    backup = params_path.with_name(params_path.name + BACKUP_SUFFIX)
    if backup.exists():
        os.replace(backup, params_path)
        print(f"restored {params_path} from {backup.name}: a killed run had left its parameters in it")
    if not variant and not overrides:
        yield
        return
    backup.write_bytes(params_path.read_bytes())
    try:
        if variant:
            params_module.apply_variant(params_path, variant)
            print(f"applied variant {variant!r} to {params_path} for this run")
        if overrides:
            params_module.edit(params_path, overrides)  # ParamsError (naming the key) before any stage
            print(f"set {overrides} in {params_path} for this run")
        yield
    finally:
        os.replace(backup, params_path)
        print(f"{params_path} restored")


def _home(parameters: dict[str, Any]) -> Path:
    ws = workspace(parameters.get("root"))
    return (ws / parameters.get("pipeline", "dvc.yaml")).parent


def _end_parent_hook(status: str, authoritative: bool = False):
    """A Prefect state hook: end this flow run's MLflow parent with ``status`` (cancelled: KILLED,
    crashed: FAILED) — the run's own ``finally`` does not run when its process is stopped.

    ``authoritative``: also re-mark a parent the flow already ended. A cancellation kills the stage's
    DVC process as well, and the flow's ``finally`` may see that stage fail (and write FAILED) before
    the signal reaches the flow itself; the cancellation is what happened, so the hook has the last word."""

    def hook(flow, run, state) -> None:
        try:
            home = _home(dict(run.parameters or {}))
            p = params_module.load(home / "params.yaml")
            if tracking.enabled(p):
                for run_id in tracking.flow_parents(home, p, str(run.id), running_only=not authoritative):
                    tracking.finish_parent(home, run_id, status=status)
        except Exception as e:  # a hook must not mask the state it reports
            print(f"could not end the MLflow parent of flow run {run.id}: {e}")

    return hook


@flow(name="bootstrap", log_prints=True, task_runner=task_runner(),
      on_cancellation=[_end_parent_hook("KILLED", authoritative=True)], on_crashed=[_end_parent_hook("FAILED")])
def bootstrap(
    params: dict[str, Any] | None = None,
    variant: str | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    root: str | None = None,
    pipeline: str = "dvc.yaml",
) -> dict[str, Any]:
    """Bring the pipeline up to date, stage by stage.

    params:  dotted overrides written into params.yaml first, e.g. {"capfilt.decoding": "beam"}.
    variant: overlay params-<variant>.yaml onto params.yaml first (e.g. "smoke").
    stages:  run only these stages (foreach groups by name), in pipeline order; their upstream is
             not added, so it must already be up to date.
    force:   re-run stages even when DVC finds them up to date.
    root:    workspace (default $BLIP_ROOT, else this repository).
    pipeline: the dvc.yaml to run, relative to root: "dvc.yaml" (the bootstrap loop) or
             "byod/dvc.yaml" (CapFilt of your own shards; params, overrides and MLflow store in byod/).

    Returns {stage: ran, ..., "mlflow_run_id": id or None}.
    """
    ws = workspace(root)
    home = (ws / pipeline).parent  # where the pipeline's params.yaml, metrics and MLflow store live
    params_path = home / "params.yaml"
    with workspace_lock(ws, f"flow run {flow_run.name or 'local'}"), run_params(params_path, variant, params):
        p = params_module.load(params_path)
        order = stage_order(ws, stages, pipeline)
        print(f"stages: {', '.join(order)}")

        run_id = None
        if tracking.enabled(p):
            tracking.close_stale_runs(home, p, "bootstrap")  # parents of flow runs killed before they could end them
            run_id = tracking.start_parent(home, p, prefect_flow_run_id=flow_run.id,
                                           prefect_flow_run_name=flow_run.name, owned=True)
            print(f"MLflow parent run {run_id}")
        summary: dict[str, Any] = {}
        status = "FAILED"
        try:
            for stage in order:
                result = run_stage.submit(stage, str(ws), force, run_id).result()
                summary[stage] = result["ran"]
            publish(home, run_id, report="report" in order)
            if any(s.rsplit(":", 1)[-1] == "assemble" for s in order) and (home / "metrics" / "clean.json").is_file():
                publish_clean(home)
            status = "FINISHED"
        except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, or the runner stopping a cancelled run
            status = "KILLED"
            raise
        finally:
            if run_id:
                tracking.finish_parent(home, run_id, status=status)
    ran = [s for s in order if summary[s]]
    print(f"ran {len(ran)} of {len(order)} stages: {', '.join(ran) or 'none (all up to date)'}")
    summary["mlflow_run_id"] = run_id
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="flows/bootstrap.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="register deployment bootstrap/full and execute its runs here (Ctrl-C stops)")
    run = sub.add_parser("run", help="run the flow once in this process (no deployment)")
    run.add_argument("--variant", help="overlay params-<VARIANT>.yaml first, e.g. smoke")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override (repeatable)")
    run.add_argument("--stage", action="append", dest="stages", metavar="STAGE", help="run only this stage (repeatable)")
    run.add_argument("--force", action="store_true", help="re-run stages DVC finds up to date")
    run.add_argument("--root", help="workspace (default $BLIP_ROOT or this repository)")
    run.add_argument("--pipeline", default="dvc.yaml", help="dvc.yaml to run (byod/dvc.yaml: clean your own shards)")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        bootstrap.serve(name="full", limit=1)  # one run at a time: one DVC lock per workspace
    else:
        summary = bootstrap(params=params_module.parse_overrides(args.set) or None, variant=args.variant, stages=args.stages,
                            force=args.force, root=args.root, pipeline=args.pipeline)
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
