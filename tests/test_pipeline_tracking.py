"""blip.pipeline.tracking against a real MLflow SQLite store (no mocks).

One store per module (each new SQLite store runs MLflow's migrations, about a second); every
test gets its own experiment name and workspace root, so searches never see another test's runs.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest

from blip.params import Params, from_dict
from blip.pipeline import tracking
from blip.track import DatasetRef

PARAMS = {
    "capfilt": {"parts": "both", "decoding": "nucleus", "models": "decoupled"},
    "model": {"preset": "tiny", "sharing": "all_except_sa", "vision": {}, "text": {"hidden_size": 32}},
    "pretrain": {"epochs": 2, "lr": 0.001, "schedule": "step"},
    "evaluate": {"k_test": 32, "retrieval_splits": ["test", "zeroshot"]},
    "mlflow": {"enabled": True, "experiment": "x"},
}
FACTORS = {"capfilt.parts": "both", "capfilt.decoding": "nucleus", "capfilt.models": "decoupled",
           "model.sharing": "all_except_sa"}


def params_for(experiment: str, enabled: bool = True, **factors) -> Params:
    p = copy.deepcopy(PARAMS)
    p["mlflow"] = {"enabled": enabled, "experiment": experiment}
    for key, value in factors.items():
        section, name = key.split("__")
        p[section][name] = value
    return from_dict(p)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # migrate once
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv(tracking.PARENT_ENV, raising=False)
        mp.delenv("BLIP_MLFLOW", raising=False)
        yield MlflowClient(tracking_uri=uri)


def runs_of(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny captioner checkpoint dir with its tokenizer."""
    import torch
    from helpers_model import micro_preset

    from blip.checkpoint import save_model
    from blip.model.blip import BlipCaptioner
    from blip.tokenizer import build_tokenizer

    tok = build_tokenizer(["a red square left of a blue circle", "a small green triangle"] * 5, vocab_size=80)
    cfg = micro_preset(tok)
    torch.manual_seed(0)
    return save_model(BlipCaptioner(cfg), tmp_path_factory.mktemp("ckpt") / "captioner", tokenizer=tok)


# -- helpers without a store --------------------------------------------------------------------------


def test_import_is_cheap():
    code = "import sys, blip.pipeline.tracking; assert not {'mlflow', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_flat_params_factors_enabled_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("BLIP_MLFLOW", raising=False)  # conftest turns tracking off for other tests
    flat = tracking.flat_params(PARAMS)
    assert flat["model.text.hidden_size"] == "32"
    assert flat["model.vision"] == "{}"
    assert flat["evaluate.retrieval_splits"] == '["test", "zeroshot"]'
    assert flat["mlflow.enabled"] == "True"
    assert set(tracking.flat_params(PARAMS, ["pretrain", "nope"])) == {
        "pretrain.epochs", "pretrain.lr", "pretrain.schedule"}
    assert len(tracking.flat_params({"a": {"b": "x" * 9000}})["a.b"]) == 6000
    assert from_dict(PARAMS).factors() == FACTORS

    assert tracking.enabled(from_dict(PARAMS))
    assert not tracking.enabled(from_dict({"mlflow": {"enabled": False}}))
    assert tracking.enabled(from_dict({}))  # the schema's default, the same everywhere
    monkeypatch.setenv("BLIP_MLFLOW", "0")
    assert not tracking.enabled(from_dict(PARAMS))

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"


# -- a whole bootstrap owned by the stages --------------------------------------------------------------


@pytest.fixture(scope="module")
def bootstrap(store, checkpoint, tmp_path_factory):
    """pretrain (metrics, artifacts, checkpoint) -> caption -> report, no parent in the environment."""
    root = tmp_path_factory.mktemp("workspace")
    params = params_for("t-bootstrap")
    extra = root / "extra"
    extra.mkdir()
    (extra / "a.txt").write_text("a")
    (root / "stats.json").write_text("{}")
    with tracking.stage_run(root, params, "pretrain", ["model", "pretrain"]) as t:
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            t.log_metrics({"train/loss": loss, "train/nan": float("nan"), "train/inf": float("inf")}, step=step)
        t.log_params({"train.epochs": 2, "train.schedule": "step"})
        t.log_artifact(root / "stats.json")
        t.log_artifact(root / "stats.json", "reports")
        t.log_artifact(extra)
        t.log_model(checkpoint, "model", hf=True)
        pretrain = t.run_id
        parent = t.parent_run_id
    after_pretrain = store.get_run(parent).info.status
    with tracking.stage_run(root, params, "caption", ["capfilt"]) as t:
        assert t.parent_run_id == parent  # a second "process" finds the RUNNING parent
    with tracking.stage_run(root, params, "report", ["evaluate"]) as t:
        t.set_parent_tags({"dvc.dataset_md5": "abc123"})
        t.log_parent_metrics({"capfilt/recall@1": 0.5, "baseline/recall@1": float("nan")})
    return {"root": root, "parent": parent, "pretrain": pretrain, "after_pretrain": after_pretrain}


def test_parent_and_children(store, bootstrap):
    runs = runs_of(store, "t-bootstrap")
    parents = [r for r in runs if r.data.tags.get("blip.role") == "bootstrap"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == bootstrap["parent"]]
    assert [p.info.run_id for p in parents] == [bootstrap["parent"]]
    assert sorted(c.info.run_name for c in children) == ["caption", "pretrain", "report"]
    assert len(runs) == 4
    assert {c.info.status for c in children} == {"FINISHED"}
    assert bootstrap["after_pretrain"] == "RUNNING"

    p = parents[0]
    assert p.info.status == "FINISHED"  # ended by the report stage
    assert p.info.run_name == "bootstrap both/nucleus/decoupled/all_except_sa"
    assert p.data.tags["blip.workspace"] == str(bootstrap["root"].resolve())
    assert p.data.tags["git.commit"] == "unknown"  # tmp dir, not a git repo
    assert p.data.tags["dvc.dataset_md5"] == "abc123"
    assert FACTORS.items() <= p.data.tags.items()
    assert p.data.params == tracking.flat_params(PARAMS | {"mlflow": {"enabled": True, "experiment": "t-bootstrap"}})
    assert p.data.metrics == {"capfilt/recall_1": 0.5}  # "@" is not allowed in a name

    exp = store.get_experiment_by_name("t-bootstrap")
    assert exp.artifact_location == (bootstrap["root"].resolve() / "mlartifacts").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # runs table, not GenAI pages
    assert tracking.run_url(bootstrap["root"], p.info.run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{p.info.run_id}")


def test_child_params_tags_metrics(store, bootstrap):
    run = store.get_run(bootstrap["pretrain"])
    assert run.data.tags["blip.stage"] == "pretrain"
    assert FACTORS.items() <= run.data.tags.items()
    assert FACTORS.items() <= run.data.params.items()
    assert run.data.params["pretrain.lr"] == "0.001"
    assert run.data.params["model.text.hidden_size"] == "32"
    assert run.data.params["train.epochs"] == "2"
    assert not any(k.startswith("evaluate.") for k in run.data.params)
    history = store.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert set(run.data.metrics) == {"train/loss"}  # NaN and inf skipped


def test_artifacts_and_hf_export(store, bootstrap, checkpoint, tmp_path):
    from transformers import BlipForConditionalGeneration, PreTrainedTokenizerFast

    run_id = bootstrap["pretrain"]

    def ls(path=None):
        return {f.path for f in store.list_artifacts(run_id, path)}

    assert ls() == {"stats.json", "reports", "extra", "model", "model-hf"}
    assert ls("reports") == {"reports/stats.json"}
    assert ls("extra") == {"extra/a.txt"}
    assert ls("model") == {"model/config.json", "model/model.safetensors", "model/tokenizer"}
    assert "model-hf/config.json" in ls("model-hf")

    local = store.download_artifacts(run_id, "model-hf", str(tmp_path))
    hf = BlipForConditionalGeneration.from_pretrained(local)
    tok = PreTrainedTokenizerFast.from_pretrained(local)
    assert hf.config.text_config.vocab_size == len(tok)


# -- parent ownership --------------------------------------------------------------------------------


def test_env_owned_parent_is_not_ended(store, tmp_path, monkeypatch):
    params = params_for("t-env")
    parent = tracking.start_parent(tmp_path, params, prefect_flow_run_id="fr-1", prefect_flow_run_name="lucky-cat",
                                   run_name="bootstrap (prefect)")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    assert tracking.resolve_parent(tmp_path, params) == (parent, True)
    for stage in ("caption", "report"):
        with tracking.stage_run(tmp_path, params, stage, ["capfilt"]) as t:
            assert t.parent_run_id == parent
    run = store.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "bootstrap (prefect)"
    assert run.data.tags["prefect.flow_run_id"] == "fr-1"
    assert run.data.tags["prefect.flow_run_name"] == "lucky-cat"
    assert len(runs_of(store, "t-env")) == 3
    tracking.finish_parent(tmp_path, parent)
    assert store.get_run(parent).info.status == "FINISHED"


def test_workspace_reuse(store, tmp_path):
    params = params_for("t-reuse")
    a, b = tmp_path / "a", tmp_path / "b"
    parent_a, owned = tracking.resolve_parent(a, params)
    assert not owned
    assert tracking.resolve_parent(a, params) == (parent_a, False)
    parent_b, _ = tracking.resolve_parent(b, params)
    assert parent_b != parent_a  # another workspace, another bootstrap
    beam = params_for("t-reuse", capfilt__decoding="beam")
    parent_beam, _ = tracking.resolve_parent(a, beam)
    assert parent_beam != parent_a  # other ablation factors, another bootstrap
    assert tracking.resolve_parent(a, params)[0] == parent_a
    tracking.finish_parent(a, parent_a)
    newer, _ = tracking.resolve_parent(a, params)
    assert newer not in (parent_a, parent_b, parent_beam)  # a finished parent is not reused


def test_failed_child(store, tmp_path):
    params = params_for("t-fail")
    with pytest.raises(ValueError, match="boom"), tracking.stage_run(tmp_path, params, "report", ["evaluate"]) as t:
        t.log_metrics({"x": 1.0})
        raise ValueError("boom")
    child, parent = store.get_run(t.run_id), store.get_run(t.parent_run_id)
    assert child.info.status == "FAILED"
    assert child.data.metrics == {"x": 1.0}
    assert parent.info.status == "RUNNING"  # a failed report leaves the bootstrap open for the rerun


def test_conflicting_param_warns(store, tmp_path, caplog):
    with tracking.stage_run(tmp_path, params_for("t-params"), "pretrain", ["pretrain"]) as t:
        t.log_params({"pretrain.lr": 0.001})  # same value: fine
        with caplog.at_level(logging.WARNING, logger="blip.pipeline.tracking"):
            t.log_params({"pretrain.lr": 0.5, "pretrain.extra": [1, 2]})
    assert "pretrain.lr" in caplog.text
    params = store.get_run(t.run_id).data.params
    assert params["pretrain.lr"] == "0.001" and params["pretrain.extra"] == "[1, 2]"


@pytest.mark.parametrize("how", ["params", "env", "rank"])
def test_disabled_writes_nothing(store, tmp_path, monkeypatch, checkpoint, how):
    params = params_for(f"t-off-{how}", enabled=how != "params")
    if how == "env":
        monkeypatch.setenv("BLIP_MLFLOW", "0")
    else:
        monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # would default to tmp_path/mlflow.db
    with tracking.stage_run(tmp_path, params, "report", ["evaluate"]) as t:
        t.log_params({"a": 1})
        t.log_metrics({"m": 1.0}, step=3)
        t.log_artifact(checkpoint / "config.json")
        t.log_model(checkpoint, "model", role="captioner", hf=True, register="blip-captioner")
        t.log_datasets([DatasetRef("web", str(tmp_path), "input")])
        t.set_parent_tags({"k": "v"})
        t.log_parent_metrics({"m": 1.0})
    assert not t.enabled and t.stage_durations() == {}
    assert list(tmp_path.iterdir()) == []
    assert store.get_experiment_by_name(f"t-off-{how}") is None


_KILLED_STAGE = """
import json, os, sys, time
from blip.params import from_dict
from blip.pipeline import tracking
params = from_dict(json.loads(sys.argv[2]))
if sys.argv[3] == "stage":
    with tracking.stage_run(sys.argv[1], params, "pretrain", ["pretrain"]) as t:
        print(t.run_id, flush=True)
        time.sleep(600)  # SIGKILLed here, mid-stage
else:
    print(tracking.start_parent(sys.argv[1], params, prefect_flow_run_id="f1", owned=True), flush=True)
    time.sleep(600)
"""


def _killed(root, params_dict: dict, role: str) -> str:
    """Run id of a run whose owning process was SIGKILLed while it was RUNNING."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_STAGE, str(root), json.dumps(params_dict), role],
                            stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    return run_id


def test_runs_left_running_by_a_killed_process_are_closed_by_the_next_run(store, tmp_path, caplog):
    """`dvc repro` SIGKILLed mid-pretrain used to leave the stage's child RUNNING forever beside the
    rerun's; a killed flow run, its parent."""
    raw = copy.deepcopy(PARAMS) | {"mlflow": {"enabled": True, "experiment": "t-killed"}}
    params = from_dict(raw)
    dead_child = _killed(tmp_path, raw, "stage")
    assert store.get_run(dead_child).info.status == "RUNNING"
    with tracking.stage_run(tmp_path, params, "pretrain", ["pretrain"]) as t:  # the rerun
        live = t.run_id
        assert store.get_run(dead_child).info.status == "KILLED"
        assert "left RUNNING by a killed process" in caplog.text
        # a run whose owner is alive (this one, seen from "another" stage) is left alone
        assert tracking.close_stale_runs(tmp_path, params, "stage") == []
    assert store.get_run(live).info.status == "FINISHED"

    dead_parent = _killed(tmp_path, raw, "parent")
    shared_parent, _ = tracking.resolve_parent(tmp_path, params)  # dvc-repro parents carry no owner: never closed
    assert tracking.close_stale_runs(tmp_path, params, "bootstrap") == [dead_parent]
    assert store.get_run(dead_parent).info.status == "KILLED"
    assert store.get_run(shared_parent).info.status == "RUNNING"
    assert tracking.flow_parents(tmp_path, params, "f1") == [dead_parent]
