"""MLflow tracking for the pipeline: one parent run per bootstrap, one child run per stage.

The store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``; a newly created
experiment keeps its artifacts in ``<root>/mlartifacts``. Everything goes through
``MlflowClient`` with explicit run ids — never MLflow's global active run — so a stage can run
inside other code (a Prefect task, a test) without the two fighting over ``mlflow.start_run``.

Who ends the parent: when ``BLIP_MLFLOW_PARENT_RUN_ID`` is set (the Prefect flow created the
parent), stages attach to it and leave it running. Otherwise the first stage reuses a RUNNING
parent of this workspace with the same ablation factors, or starts one, and the ``report``
stage finishes it.

``mlflow`` (1-2 s to import) and ``torch`` are imported inside the functions that need them.
Parameters come in as a typed :class:`blip.params.Params`; its ``raw`` mapping is what gets
recorded, exactly as written in ``params.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..params import Params
from ..track import DatasetRef, NullTracker, flatten, is_main_process

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "blip-bootstrap"
DEFAULT_UI_URL = "http://127.0.0.1:5000"
PARENT_ENV = "BLIP_MLFLOW_PARENT_RUN_ID"
ROLE_TAG, WORKSPACE_TAG, STAGE_TAG = "blip.role", "blip.workspace", "blip.stage"
HOST_TAG, PID_TAG = "blip.host", "blip.pid"  # the process that owns a RUNNING run (stage, or a flow's parent)
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, no runs table).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"

_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


# -- pure helpers -------------------------------------------------------------------------------------


def tracking_uri(root: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def enabled(params: Params) -> bool:
    """``mlflow.enabled`` (default true), unless the environment says ``BLIP_MLFLOW=0``."""
    return params.mlflow.enabled and os.environ.get("BLIP_MLFLOW") != "0"


def _key(name: str) -> str:
    """A valid MLflow param/metric name: characters outside ``[/\\w.\\- :]`` become ``_`` and the
    path is normalised (``a//b`` -> ``a/b``), else MLflow rejects the whole batch."""
    key = posixpath.normpath(re.sub(r"[^/\w.\- :]", "_", str(name))).lstrip("/")
    return "_" if key in ("", ".") or key.startswith("..") else key


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        s = json.dumps(value, default=str)
    else:
        s = str(value)
    return s if len(s) <= _MAX_PARAM_VALUE else s[: _MAX_PARAM_VALUE - 3] + "..."


def flat_params(params: dict[str, Any], sections: list[str] | tuple[str, ...] | None = None) -> dict[str, str]:
    """``{"section.key": str(value)}`` of a params mapping (``Params.raw``) with nested dicts dotted,
    lists (and empty dicts) as JSON. ``sections`` picks top-level sections (all when ``None``);
    names not in ``params`` are skipped.
    """
    names = list(params) if sections is None else [s for s in sections if s in params]
    return {k: _param_value(v) for k, v in flatten({str(n): params[n] for n in names}).items()}


def _git_commit(root: Path) -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


# -- MLflow plumbing ----------------------------------------------------------------------------------


def _client(root: str | Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def _is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def _experiment_id(client, root: str | Path, params: Params) -> str:
    """Get or create the experiment named in ``mlflow.experiment``, marked as a model-training one for
    the UI; a new one keeps its artifacts in ``<root>/mlartifacts`` (a remote server keeps its own
    artifact root)."""
    from mlflow.exceptions import MlflowException

    name = params.mlflow.experiment or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    location = None
    if not _is_remote(tracking_uri(root)):
        location = (Path(root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    except MlflowException:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(_key(k), v) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH], synchronous=True)


def _log_metrics(client, run_id: str, metrics: dict[str, Any], step: int | None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for k, v in metrics.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            log.warning("mlflow: metric %s=%r is not a number; skipped", k, v)
            continue
        if math.isfinite(v):
            items.append(Metric(_key(k), v, now, int(step or 0)))
    for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH], synchronous=True)


def _set_tags(client, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + _MAX_PARAMS_PER_BATCH], synchronous=True)


# -- parent runs --------------------------------------------------------------------------------------


def _run_name(params: Params) -> str:
    return "bootstrap " + "/".join(params.factors().values())


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the owner of a run, so a later run can tell it was killed."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def owner_gone(tags: dict[str, str]) -> bool:
    """True when the run's owning process was on this host and no longer exists (SIGKILL, OOM,
    a cancelled flow). Another host's runs, or an owner still alive, are left alone."""
    if tags.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        pid = int(tags.get(PID_TAG, ""))
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return False


def close_stale_runs(root: str | Path, params: Params, role: str) -> list[str]:
    """Mark KILLED every RUNNING run of ``role`` (``stage`` or ``bootstrap``) in this workspace whose
    owning process is gone (:func:`owner_gone`): what a SIGKILLed ``dvc repro`` or a killed flow
    run left behind. Returns their ids. Runs without owner tags (a parent that ``dvc repro``
    stages share) are never touched."""
    root = Path(root).resolve()
    client = _client(root)
    runs = client.search_runs(
        [_experiment_id(client, root, params)],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = '{role}'",
        max_results=500,
    )
    closed = []
    for run in runs:
        tags = run.data.tags
        if tags.get(WORKSPACE_TAG) == str(root) and owner_gone(tags):
            client.set_tag(run.info.run_id, "blip.closed", f"owner process {tags.get(PID_TAG)} gone; closed by "
                                                            f"pid {os.getpid()}")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            log.warning("mlflow: %s run %s (%s) was left RUNNING by a killed process: marked KILLED", role,
                        run.info.run_id, tags.get(STAGE_TAG, run.info.run_name))
    return closed


def start_parent(
    root: str | Path,
    params: Params,
    *,
    prefect_flow_run_id: str | None = None,
    prefect_flow_run_name: str | None = None,
    run_name: str | None = None,
    owned: bool = False,
) -> str:
    """Create the parent run of one bootstrap (all params, git commit, factors as tags); returns its id.
    ``owned``: this process ends it (a flow run): tagged with :func:`owner_tags`, so the next run
    closes it if this process is killed first."""
    root = Path(root).resolve()
    client = _client(root)
    commit = _git_commit(root)
    tags = {
        ROLE_TAG: "bootstrap",
        WORKSPACE_TAG: str(root),
        "git.commit": commit,
        **params.factors(),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if prefect_flow_run_id is not None:
        tags["prefect.flow_run_id"] = str(prefect_flow_run_id)
    if prefect_flow_run_name is not None:
        tags["prefect.flow_run_name"] = str(prefect_flow_run_name)
    if owned:
        tags.update(owner_tags())
    run = client.create_run(_experiment_id(client, root, params), tags=tags, run_name=run_name or _run_name(params))
    _log_params(client, run.info.run_id, flat_params(params.raw))
    log.info("mlflow: started parent run %s", run.info.run_id)
    return run.info.run_id


def resolve_parent(root: str | Path, params: Params) -> tuple[str, bool]:
    """The parent for a stage: ``($BLIP_MLFLOW_PARENT_RUN_ID, True)``, else ``(id, False)`` of the newest
    RUNNING bootstrap of this workspace with the same factors, else of a new one."""
    env = os.environ.get(PARENT_ENV)
    if env:
        return env, True
    root = Path(root).resolve()
    client = _client(root)
    exp_id = _experiment_id(client, root, params)
    runs = client.search_runs(
        [exp_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = 'bootstrap'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    factors = params.factors()
    for run in runs:
        tags = run.data.tags
        if PID_TAG in tags:  # a flow run's own parent: the flow ends it, a hand-run stage does not join it
            continue
        if tags.get(WORKSPACE_TAG) == str(root) and all(tags.get(k) == v for k, v in factors.items()):
            return run.info.run_id, False
    return start_parent(root, params), False


def log_study(root: str | Path, summary: dict, files: list[str]) -> str:
    """One run ``study`` in the bootstrap experiment: per cell and metric the mean (and std) over
    seeds as metrics, the comparisons' verdicts as tags, ``docs/study.md`` and the charts as
    artifacts. Returns the run id."""
    import statistics

    from ..params import load as load_params

    root = Path(root).resolve()
    client = _client(root)
    exp_id = _experiment_id(client, root, load_params(root / "params.yaml"))
    run = client.create_run(exp_id, tags={ROLE_TAG: "study", WORKSPACE_TAG: str(root), "git.commit": _git_commit(root)},
                            run_name="study")
    metrics = {}
    for cell, values in summary["cells"].items():
        for m, v in values.items():
            if v:
                metrics[f"{cell}/{m}/mean"] = statistics.mean(v)
                if len(v) > 1:
                    metrics[f"{cell}/{m}/std"] = statistics.stdev(v)
    _log_metrics(client, run.info.run_id, metrics, None)
    _set_tags(client, run.info.run_id, {f"verdict.table{c['table']}.{c['better']}-vs-{c['worse']}.{c['metric']}":
                                        c["verdict"] for c in summary["comparisons"]})
    for f in files:
        client.log_artifact(run.info.run_id, f)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def flow_parents(root: str | Path, params: Params, flow_run_id: str, running_only: bool = False) -> list[str]:
    """Ids of the parent runs a Prefect flow run created (tag ``prefect.flow_run_id``)."""
    root = Path(root).resolve()
    client = _client(root)
    status = " and attributes.status = 'RUNNING'" if running_only else ""
    runs = client.search_runs([_experiment_id(client, root, params)],
                              filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'{status}")
    return [r.info.run_id for r in runs]


def finish_parent(root: str | Path, run_id: str, status: str = "FINISHED") -> None:
    """End the parent run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
    _client(root).set_terminated(run_id, status=status)


def run_url(root: str | Path, run_id: str) -> str:
    """The run's page in the MLflow UI (``$MLFLOW_UI_URL``, default ``http://127.0.0.1:5000``)."""
    exp_id = _client(root).get_run(run_id).info.experiment_id
    base = (os.environ.get("MLFLOW_UI_URL") or DEFAULT_UI_URL).rstrip("/")
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


# -- stage runs ---------------------------------------------------------------------------------------


class StageTracker:
    """A child run: the MLflow implementation of :class:`blip.track.Tracker`."""

    enabled = True

    def __init__(self, root: str | Path, client, run_id: str, parent_run_id: str, stage: str = "",
                 factors: dict[str, str] | None = None) -> None:
        self.root = Path(root).resolve()
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.stage = stage
        self.factors = dict(factors or {})
        self._params: dict[str, str] = {}
        self._model_dirs: set[str] = set()

    # blip.track.Tracker
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (nested dicts dotted). A key already logged with the same value is skipped; a
        different value for it is warned about and skipped, since MLflow params are immutable."""
        flat = {_key(k): _param_value(v) for k, v in flatten({str(k): v for k, v in params.items()}).items()}
        new = {}
        for k, v in flat.items():
            old = self._params.get(k)
            if old is None:
                new[k] = v
            elif old != v:
                log.warning("mlflow: param %s already logged as %r; not changing it to %r", k, old, v)
        if new:
            _log_params(self.client, self.run_id, new)
            self._params.update(new)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Batch-log ``metrics`` at ``step`` (0 when None); NaN/inf values are skipped, characters
        MLflow refuses in a name (e.g. ``@``) become ``_``."""
        _log_metrics(self.client, self.run_id, metrics, step)

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        """A file goes under the artifact dir ``name`` (root when None); a directory's contents go
        under ``name`` (the directory's own name when None)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), name or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), name)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or directory")

    def log_model(self, path: str | Path, name: str, *, role: str | None = None, hf: bool = False,
                  register: str | None = None) -> None:
        """Log a checkpoint dir (``config.json`` + ``model.safetensors`` + ``tokenizer/``) under ``name/``
        (once, however many roles it plays); with ``hf`` also its transformers export (weights +
        processor) under ``name-hf/``. With a ``role`` (captioner | filter) it also becomes an MLflow
        model (pyfunc that captions / scores images) linked to this run, and with ``register`` a
        version of that registered model, tagged with the bootstrap's factors."""
        from .mlflow_models import log_blip_model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
        if name not in self._model_dirs:
            self.client.log_artifacts(self.run_id, str(path), name)
            self._model_dirs.add(name)
        if hf and f"{name}-hf" not in self._model_dirs:
            self._log_hf(path, f"{name}-hf")
        if role is not None:
            tags = {**self.factors, "blip.stage": self.stage, "blip.bootstrap_run_id": self.parent_run_id}
            log_blip_model(self.client, self.run_id, path, role=role, registered_name=register,
                                         tags=tags)

    def _log_hf(self, path: Path, name: str) -> None:
        from blip.checkpoint import load_model
        from blip.convert import save_hf
        from blip.tokenizer import BlipTokenizer

        model = load_model(path)
        tokenizer = BlipTokenizer.load(path / "tokenizer") if (path / "tokenizer" / "tokenizer.json").exists() else None
        tmp = Path(tempfile.mkdtemp(prefix="blip-hf-"))
        try:
            save_hf(model, tmp, kind="captioner", tokenizer=tokenizer)
            self.client.log_artifacts(self.run_id, str(tmp), name)
            self._model_dirs.add(name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def log_datasets(self, datasets: list[DatasetRef]) -> None:
        """Record datasets this stage read or wrote as MLflow dataset inputs (the runs table's Dataset
        column); the digest is DVC's md5 of the data (``mlflow_datasets.dataset_digest``)."""
        from .mlflow_datasets import log_datasets

        log_datasets(self.client, self.run_id, list(datasets), lock_path=self.root / "dvc.lock")

    def set_parent_tags(self, tags: dict[str, Any]) -> None:
        _set_tags(self.client, self.parent_run_id, tags)

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        _log_metrics(self.client, self.parent_run_id, metrics, None)

    def stage_durations(self) -> dict[str, float]:
        """Wall seconds of the parent's finished stage runs, in start order (this bootstrap's timing)."""
        runs = self.client.search_runs(
            [self.client.get_run(self.parent_run_id).info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"], max_results=1000,
        )
        return {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time}


@contextmanager
def stage_run(
    root: str | Path, params: Params, stage: str, sections: list[str] | tuple[str, ...] | None = None
) -> Iterator[StageTracker | NullTracker]:
    """A child run named ``stage`` under :func:`resolve_parent`'s parent, with the ``sections``' params
    and the factors (as params and tags). The child ends FAILED when the body raises (re-raised),
    else FINISHED; a ``report`` stage also finishes a parent that the environment does not own."""
    if not enabled(params) or not is_main_process():
        yield NullTracker()
        return
    root = Path(root).resolve()
    client = _client(root)
    close_stale_runs(root, params, "stage")
    parent_id, env_owned = resolve_parent(root, params)
    exp_id = client.get_run(parent_id).info.experiment_id
    factors = params.factors()
    tags = {PARENT_TAG: parent_id, STAGE_TAG: stage, ROLE_TAG: "stage", WORKSPACE_TAG: str(root), **factors,
            **owner_tags()}
    run = client.create_run(exp_id, tags=tags, run_name=stage)
    tracker = StageTracker(root, client, run.info.run_id, parent_id, stage, factors)
    tracker.log_params({**flat_params(params.raw, sections), **factors})
    log.info("mlflow: stage %s -> run %s (parent %s)", stage, tracker.run_id, parent_id)
    try:
        yield tracker
    except SystemExit as e:
        ok = e.code in (0, None)
        client.set_terminated(tracker.run_id, status="FINISHED" if ok else "FAILED")
        if ok and stage == params.mlflow.final_stage and not env_owned:
            finish_parent(root, parent_id)
        raise
    except KeyboardInterrupt:
        client.set_terminated(tracker.run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(tracker.run_id, status="FAILED")
        raise
    client.set_terminated(tracker.run_id, status="FINISHED")
    if stage == params.mlflow.final_stage and not env_owned:
        finish_parent(root, parent_id)
