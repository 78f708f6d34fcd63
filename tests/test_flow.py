"""The bootstrap flow through a real Prefect server and its ``full`` deployment (no mocks).

A module-scoped ``prefect server start`` (SQLite under a temp PREFECT_HOME) and one
``python flows/bootstrap.py serve`` process in a fresh project checkout (``pipeline_repo``, smoke
variant) serve every test; runs are started the way a user starts them, with
``prefect deployment run bootstrap/full --watch``, and checked through the server's REST API, the
checkout's MLflow store and ``dvc status``. The full run executes the whole smoke pipeline (every
stage a fresh ``python -m blip`` process: a few minutes on 2 cores); the rest takes about 40 s.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from pipeline_repo import make_repo, repo_env, run

pytestmark = pytest.mark.slow

FLOW_ARTIFACTS = {"bootstrap-results", "bootstrap-report", "mlflow-run"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    """GET (``body`` None) or POST JSON to the Prefect REST API; None on 404."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise AssertionError(f"{path}: HTTP {e.code}: {e.read()[:500]!r}") from None


def _stop(proc: subprocess.Popen, sig: int, timeout: float = 20) -> None:
    """Signal a process we started; kill its session (flow-run subprocesses included) if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        if ready():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A real Prefect API: yields (api_url, env for Prefect clients)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = repo_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")
    env.pop("BLIP_ROOT", None)
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait("prefect server", lambda: _health(api_url), server, log, timeout=120)
        yield api_url, {**env, "PREFECT_API_URL": api_url}
    finally:
        _stop(server, signal.SIGTERM)


def _health(api_url: str) -> bool:
    try:
        return _api(api_url, "/health") is True
    except (OSError, AssertionError):
        return False


@pytest.fixture(scope="module")
def served(prefect, tmp_path_factory):
    """A project checkout whose ``python flows/bootstrap.py serve`` has registered bootstrap/full."""
    api_url, env = prefect
    repo = make_repo(tmp_path_factory.mktemp("flow") / "repo")
    log = repo.parent / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "flows/bootstrap.py", "serve"], cwd=repo,
                                 env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait("bootstrap/full deployment", lambda: _api(api_url, "/deployments/name/bootstrap/full") is not None,
              serve, log, timeout=90)
        yield repo, log
    finally:
        _stop(serve, signal.SIGINT)


def _run_deployment(env: dict, name: str, parameters: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "bootstrap/full", "--watch",
                           "--watch-timeout", str(int(timeout)), "--flow-run-name", name,
                           "--params", json.dumps(parameters)],
                          env=env, capture_output=True, text=True, timeout=timeout + 60, check=False)


def _flow_run(api_url: str, name: str) -> dict:
    runs = _api(api_url, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    assert len(runs) == 1, f"flow runs named {name!r}: {runs}"
    return runs[0]


def _task_runs(api_url: str, flow_run_id: str) -> list[dict]:
    return _api(api_url, "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})


def _parent_runs(repo: Path, flow_run_id: str):
    from mlflow.tracking import MlflowClient

    if not (repo / "mlflow.db").exists():
        return None, []
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exp_ids, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


def test_bad_param_key_fails_before_any_stage(prefect, served):
    api_url, env = prefect
    repo, log = served
    before = (repo / "params.yaml").read_bytes()

    p = _run_deployment(env, "bad-key", {"params": {"capfilt.no_such_key": 1}}, timeout=180)

    assert p.returncode == 1, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\nserve log:\n{log.read_text()[-6000:]}"
    fr = _flow_run(api_url, "bad-key")
    assert fr["state"]["type"] == "FAILED", fr["state"]
    assert "capfilt.no_such_key" in fr["state"]["message"], fr["state"]["message"]  # the ParamsError's words
    assert _task_runs(api_url, fr["id"]) == []  # no stage was started
    assert (repo / "params.yaml").read_bytes() == before
    assert _parent_runs(repo, fr["id"])[1] == []  # no MLflow parent either


def test_a_cancelled_flow_run_ends_its_mlflow_parent_killed(prefect, served):
    """Cancelled mid-stage (the Prefect UI's Cancel): the run's MLflow parent ends KILLED (the
    flow's on_cancellation hook: its own ``finally`` never runs), the workspace params are as
    committed, and the workspace is free for the next run (the full run below finishes the work)."""
    api_url, env = prefect
    repo, log = served
    params_before = (repo / "params.yaml").read_bytes()
    p = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "bootstrap/full", "--flow-run-name",
                        "to-cancel", "--params", json.dumps({"params": {"capfilt.decoding": "nucleus"}})],
                       env=env, capture_output=True, text=True, timeout=120, check=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # until a stage task is running
        fr = _flow_run(api_url, "to-cancel")
        # a task run the server has just created may not have a state yet (``None``)
        if any((t.get("state") or {}).get("type") == "RUNNING" for t in _task_runs(api_url, fr["id"])):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no stage started:\n{p.stdout}\n{log.read_text()[-4000:]}")
    _api(api_url, f"/flow_runs/{fr['id']}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}})
    deadline = time.monotonic() + 120
    while (_flow_run(api_url, "to-cancel").get("state") or {}).get("type") != "CANCELLED":
        assert time.monotonic() < deadline, f"not cancelled:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while True:  # the hook runs in the runner after the flow's process is gone, and has the last word
        _, parents = _parent_runs(repo, fr["id"])
        if len(parents) == 1 and parents[0].info.status == "KILLED":
            break
        status = [r.info.status for r in parents]
        assert time.monotonic() < deadline, f"parents {status}, not one KILLED:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    # the run's params are taken out of params.yaml: now, or by the next run if the kill beat the restore
    backup = repo / "params.yaml.flow-backup"
    assert (repo / "params.yaml").read_bytes() == params_before or backup.read_bytes() == params_before


def test_full_deployment_runs_the_pipeline(prefect, served):
    api_url, env = prefect
    repo, log = served
    stages = run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], repo).stdout.split()
    backup = repo / "params.yaml.flow-backup"  # left by the cancelled run if it was stopped before restoring
    params_before = (backup if backup.exists() else repo / "params.yaml").read_bytes()

    p = _run_deployment(env, "full-nucleus", {"params": {"capfilt.decoding": "nucleus"}}, timeout=1200)

    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\nserve log:\n{log.read_text()[-6000:]}"
    fr = _flow_run(api_url, "full-nucleus")
    assert fr["state"]["type"] == "COMPLETED"

    # one Completed task run per DVC stage, dependencies first
    tasks = sorted(_task_runs(api_url, fr["id"]), key=lambda t: t["start_time"])
    assert sorted(t["name"] for t in tasks) == sorted(stages)
    assert {t["state"]["name"] for t in tasks} == {"Completed"}
    assert tasks[0]["name"] == "data" and tasks[-1]["name"] == "report"

    # the override went through params.yaml, so DVC recorded it; the file is back as committed, so
    # the next plain run is not a nucleus run (the committed decoding is beam) (DVC sees the decoding-dependent stages as changed)
    assert (repo / "params.yaml").read_bytes() == params_before
    assert not (repo / "params.yaml.flow-backup").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["caption"]["params"]["params.yaml"]["capfilt.decoding"] == "nucleus"
    stale = json.loads(run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo).stdout)
    assert "caption" in stale and "data" not in stale and "pretrain" not in stale, stale

    # one MLflow parent for this flow run, finished by the flow, with the stages' runs under it
    client, parents = _parent_runs(repo, fr["id"])
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_name"] == "full-nucleus"
    assert parent.data.tags["capfilt.decoding"] == "nucleus"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    child_stages = {c.data.tags.get("blip.stage") for c in children}
    assert child_stages and child_stages <= set(stages), child_stages

    # artifacts: results table (one row per metric), report.md, link to the MLflow run
    artifacts = {a["key"]: a for a in _api(api_url, "/artifacts/filter",
                                           {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})}
    assert FLOW_ARTIFACTS <= set(artifacts)
    report = json.loads((repo / "metrics" / "report.json").read_text())
    rows = artifacts["bootstrap-results"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    numeric = {k for section in ("baseline", "capfilt") for k, v in report[section].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric and numeric <= {r["metric"] for r in rows}
    row = next(r for r in rows if r["metric"] in report["baseline"] and r["metric"] in report["capfilt"])
    assert row["baseline"] == pytest.approx(report["baseline"][row["metric"]], abs=1e-4)
    report_md = (repo / "report.md").read_text()
    link = "](plots/capfilt_gallery.png)"
    assert link in report_md  # the gallery, linked from report.md and inlined for the Prefect UI
    assert artifacts["bootstrap-report"]["data"] == report_md.replace(link, "](data:image/png;base64," + base64.b64encode(
        (repo / "plots/capfilt_gallery.png").read_bytes()).decode() + ")")
    assert parent.info.run_id in artifacts["mlflow-run"]["data"]


def test_a_plain_run_after_a_parameterised_one_uses_the_committed_params(prefect, served):
    """A run's parameters do not leak into the next run: after the nucleus run above, a plain run
    of the caption stage captions with the committed decoding."""
    api_url, env = prefect
    repo, log = served
    committed = yaml.safe_load((repo / "params.yaml").read_text())["capfilt"]["decoding"]
    assert committed != "nucleus"

    p = _run_deployment(env, "plain-caption", {"stages": ["caption"]}, timeout=300)

    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\nserve log:\n{log.read_text()[-6000:]}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["caption"]["params"]["params.yaml"]["capfilt.decoding"] == committed
    assert [t["name"] for t in _task_runs(api_url, _flow_run(api_url, "plain-caption")["id"])] == ["caption"]


def test_capfilt_pipeline_runs_through_the_flow(prefect, served):
    """``pipeline: byod/dvc.yaml`` (the bootstrap/capfilt deployment): only the bring-your-own-data
    stages run, with byod/params.yaml (here: the checkout's own fine-tuned models on its web
    shards), an MLflow parent in byod/'s store, and the clean-data artifacts."""
    api_url, env = prefect
    repo, log = served
    run([sys.executable, "-m", "dvc", "repro", "finetune_captioner", "finetune_filter"], repo)  # byod's defaults

    p = _run_deployment(env, "byod", {"pipeline": "byod/dvc.yaml"}, timeout=600)

    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\nserve log:\n{log.read_text()[-6000:]}"
    fr = _flow_run(api_url, "byod")
    assert fr["state"]["type"] == "COMPLETED"
    tasks = sorted(_task_runs(api_url, fr["id"]), key=lambda t: t["start_time"])
    assert [t["name"] for t in tasks] == ["byod/dvc.yaml:caption", "byod/dvc.yaml:filter", "byod/dvc.yaml:assemble"]
    stats = json.loads((repo / "byod" / "metrics" / "clean.json").read_text())
    web = stats["sources"]["web"]
    assert web["input"] == 48 and web["kept"] + web["dropped"] == 48
    artifacts = {a["key"] for a in _api(api_url, "/artifacts/filter",
                                        {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})}
    assert {"capfilt-clean", "capfilt-gallery", "mlflow-run"} <= artifacts
    client, parents = _parent_runs(repo / "byod", fr["id"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_prefect_yaml_deploys_to_the_work_pool(prefect, served):
    """``prefect deploy`` accepts prefect.yaml; the pull step keeps ``{{ $BLIP_ROOT }}`` for the worker."""
    api_url, env = prefect
    repo, _ = served
    env = {k: v for k, v in env.items() if k != "BLIP_ROOT"}
    run([sys.executable, "-m", "prefect", "work-pool", "create", "blip-gpu", "--type", "process"], repo, **env)
    # only `smoke`: deploying `full` would repoint the served bootstrap/full at the work pool
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", "smoke"], repo, **env)

    dep = _api(api_url, "/deployments/name/bootstrap/smoke")
    assert dep["entrypoint"] == "flows/bootstrap.py:bootstrap"
    assert dep["work_pool_name"] == "blip-gpu"
    assert dep["parameters"] == {"variant": "smoke"}
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $BLIP_ROOT }}"}}]
    # the study flow deploys too (its parameters come from flows/study.py's signature)
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", "capfilt"], repo, **env)
    assert _api(api_url, "/deployments/name/bootstrap/capfilt")["parameters"] == {"pipeline": "byod/dvc.yaml"}
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", "quick"], repo, **env)
    study = _api(api_url, "/deployments/name/study/quick")
    assert study["entrypoint"] == "flows/study.py:study" and study["parameters"] == {"size": "quick"}
    assert set(study["parameter_openapi_schema"]["properties"]) == {"size", "tables", "seeds", "root"}
