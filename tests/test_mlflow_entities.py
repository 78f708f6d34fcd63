"""blip.pipeline.mlflow_datasets and mlflow_models against a real MLflow SQLite store (no mocks): datasets as run inputs,
the captioner and the filter as LoggedModels with a pyfunc flavour, registry versions.

One store and one tiny world per module: 4 web images in one shard, 2 human images, a
random-init micro captioner and filter saved as real checkpoints.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from blip.pipeline import mlflow_datasets, mlflow_models

FACTORS = {"capfilt.parts": "both", "capfilt.decoding": "nucleus", "capfilt.models": "decoupled",
           "model.sharing": "all_except_sa"}
LOCK = """\
schema: '2.0'
stages:
  assemble:
    cmd: python -m blip assemble
    deps:
    - path: gen/human
      hash: md5
      md5: 11111111111111111111111111111111.dir
    outs:
    - path: bootstrapped
      hash: md5
      md5: 22222222222222222222222222222222.dir
  repretrain:
    cmd: python -m blip repretrain
    deps:
    - path: bootstrapped
      hash: md5
      md5: 33333333333333333333333333333333.dir
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root/gen/{web,human} shards, root/bootstrapped (one shard + sizes.json, no _stats.json),
    root/dvc.lock (human as a dep, bootstrapped as an out), root/{captioner,filter} checkpoints."""
    import torch
    from helpers_model import micro_preset

    from blip.checkpoint import save_model
    from blip.data.corpus import caption_corpus
    from blip.data.generator import GenerateConfig, generate
    from blip.data.shards import write_sizes
    from blip.model.blip import BlipCaptioner, BlipRetrieval
    from blip.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("assets")
    generate(GenerateConfig(seed=0, web=4, human=2, val=0, test=0, zeroshot=0, shard_size=4), str(root / "gen"),
             processes=1, progress=False)
    (root / "bootstrapped").mkdir()
    shutil.copy(root / "gen" / "web" / "00000.tar", root / "bootstrapped" / "00000.tar")
    write_sizes(str(root / "bootstrapped"), {"00000.tar": 4})
    (root / "dvc.lock").write_text(LOCK)
    tok = build_tokenizer(caption_corpus([root / "gen" / "web", root / "gen" / "human"]), vocab_size=200)
    cfg = micro_preset(tok)
    torch.manual_seed(0)
    save_model(BlipCaptioner(cfg), root / "captioner", tokenizer=tok)
    save_model(BlipRetrieval(cfg), root / "filter", tokenizer=tok)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A client of a fresh SQLite store, which is also the global tracking URI (``models:/`` loading)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # migrate once
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield client


def new_run(client, tmp_path, name: str) -> str:
    exp = client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    return client.create_run(exp, run_name=name).info.run_id


def shard_frame(world):
    """The first web shard as the pyfunc's input: image bytes, raw text, key, shard file name."""
    import pandas as pd

    from blip.data.tario import RawSample, iter_shard_samples

    rows = [s for s in iter_shard_samples(str(world / "gen" / "web" / "00000.tar")) if isinstance(s, RawSample)]
    return pd.DataFrame({"image": [s.fields["jpg"] for s in rows], "text": [s.fields["txt"].decode() for s in rows],
                         "key": [s.key for s in rows], "shard": "00000.tar"})


def assert_untouched(client, run_id):
    import mlflow

    assert client.get_run(run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None


def test_import_is_cheap():
    code = "import sys, blip.pipeline.mlflow_datasets, blip.pipeline.mlflow_models; assert not {'mlflow', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_digest_is_dvc_md5_of_the_content_else_what_dvc_recorded(world, tmp_path, monkeypatch):
    web = world / "gen" / "web"
    digest = mlflow_datasets.dataset_digest(web)
    assert digest == mlflow_datasets.dvc_md5(web) and digest.endswith(".dir")
    copy = tmp_path / "web"
    shutil.copytree(web, copy)
    assert mlflow_datasets.dataset_digest(copy) == digest  # content, not place or mtime
    stats = copy / "00000_stats.json"
    stats.write_bytes(stats.read_bytes().replace(b'"count": 4', b'"count": 5'))
    assert mlflow_datasets.dataset_digest(copy) != digest
    # a stale dvc.lock entry never wins over the content (the writing stage runs before DVC records it)
    assert mlflow_datasets.dataset_digest(world / "bootstrapped") == mlflow_datasets.dvc_md5(world / "bootstrapped")
    # data too large to hash: what DVC recorded (an out beats a dep; a `dvc add` file), else size + mtime
    monkeypatch.setattr(mlflow_datasets, "HASH_BUDGET", 0)
    assert mlflow_datasets.dataset_digest(world / "bootstrapped") == "22222222222222222222222222222222.dir"
    assert mlflow_datasets.dataset_digest(world / "gen" / "human") == "11111111111111111111111111111111.dir"
    (tmp_path / "web.dvc").write_text("outs:\n- md5: 33333333333333333333333333333333.dir\n  path: web\n")
    assert mlflow_datasets.dataset_digest(copy) == "33333333333333333333333333333333.dir"
    assert mlflow_datasets.dataset_digest(web, lock_path=tmp_path / "dvc.lock") == mlflow_datasets.fingerprint(web)
    assert mlflow_datasets.dataset_profile(world / "gen" / "human") == {
        "files": 3, "bytes": mlflow_datasets.dataset_profile(world / "gen" / "human")["bytes"], "shards": 1, "samples": 2,
        "pairs": 10}
    assert mlflow_datasets.dataset_profile(world / "bootstrapped")["samples"] == 4  # from sizes.json


def test_datasets_become_run_inputs_with_digest_and_context(world, store, tmp_path):
    import json

    client = store
    run_id = new_run(client, tmp_path, "datasets")
    logged = mlflow_datasets.log_datasets(client, run_id, [
        ("web", world / "gen" / "web", None, "training"),
        ("human", world / "gen" / "human", None, "training"),
        ("bootstrapped", world / "bootstrapped", None, "output"),
    ])
    assert [d["name"] for d in logged] == ["web", "human", "bootstrapped"]
    inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"web", "human", "bootstrapped"}
    for name, path in (("bootstrapped", world / "bootstrapped"), ("human", world / "gen" / "human"),
                       ("web", world / "gen" / "web")):
        assert inputs[name].dataset.digest == mlflow_datasets.dvc_md5(path)
    context = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()}
    assert context == {"web": "training", "human": "training", "bootstrapped": "output"}
    web = inputs["web"].dataset
    assert web.source_type == "local" and json.loads(web.source) == {"uri": str((world / "gen" / "web").resolve())}
    assert json.loads(web.profile)["samples"] == 4 and json.loads(web.profile)["digest_from"] == "md5"
    with pytest.raises(ValueError, match="context 'train'"):
        mlflow_datasets.log_datasets(client, run_id, [("web", world / "gen" / "web", None, "train")])
    assert_untouched(client, run_id)


def test_captioner_is_a_registered_pyfunc_that_captions_as_the_caption_stage(world, store, tmp_path):
    import mlflow

    from blip.capfilt.caption import caption_shards
    from blip.capfilt.config import CaptionConfig

    client = store
    run_id = new_run(client, tmp_path, "captioner")
    out = mlflow_models.log_blip_model(client, run_id, world / "captioner", role="captioner", registered_name="blip-captioner",
                            tags=FACTORS, step=3)
    assert out["version"] == "1" and out["model_uri"] == f"models:/{out['model_id']}"
    # linked to the run: its outputs (the runs table's Models column) and as the model's source run
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs] == [(out["model_id"], 3)]
    exp_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.model_id for m in found] == [out["model_id"]]
    model = client.get_logged_model(out["model_id"])
    assert str(model.status) == "READY" and model.tags["capfilt.parts"] == "both"
    assert model.params["arch"] == "BlipCaptioner" and model.params["vision.image_size"] == "32"
    # registry: a version with the factors, pointing back at the LoggedModel and the run
    mv = client.get_model_version("blip-captioner", out["version"])
    assert {k: mv.tags[k] for k in FACTORS} == FACTORS
    assert mv.run_id == run_id and mv.source == out["model_uri"]
    assert '"blip-captioner"' in model.tags["mlflow.modelVersions"]
    assert_untouched(client, run_id)

    # the pyfunc reproduces the caption stage's nucleus captions, given each sample's key and shard
    caption_shards(CaptionConfig(device="cpu", progress=False), world / "captioner",
                   world / "gen" / "web" / "00000.tar", tmp_path / "captions")
    stage = {r["key"]: r["caption"] for r in pq.read_table(tmp_path / "captions" / "00000.parquet").to_pylist()}
    df = shard_frame(world)
    pyfunc = mlflow.pyfunc.load_model(out["model_uri"])
    captions = pyfunc.predict(df[["image", "key", "shard"]])
    assert list(captions) == [stage[k] for k in df["key"]]
    assert len(captions) == len(df) and all(isinstance(c, str) for c in captions)
    # without keys a caption depends on the image only, not on its row; paths work as well as bytes
    paths = []
    for i, data in enumerate(df["image"]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Path(paths[-1]).write_bytes(data)
    short = {"max_length": 8}  # predict-time params override the logged defaults
    plain = list(pyfunc.predict(df[["image"]], params=short))
    backwards = pyfunc.predict(df[["image"]].assign(image=paths[::-1]), params=short)
    assert list(backwards) == plain[::-1]
    with pytest.raises(ValueError, match="row 0"):
        pyfunc.predict(df[["image"]].assign(image=b"not an image"))


def test_filter_pyfunc_scores_as_the_filter_stage_and_registers_from_another_default_store(
        world, store, tmp_path, monkeypatch):
    import mlflow

    from blip.capfilt.config import FilterConfig
    from blip.capfilt.filter import score_shards

    client = store
    run_id = new_run(client, tmp_path, "filter")
    elsewhere = tmp_path / "elsewhere.db"
    with monkeypatch.context() as mp:  # the default client points at another store
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
        out = mlflow_models.log_blip_model(client, run_id, world / "filter", role="filter", registered_name="blip-filter",
                                tags=FACTORS)
    assert not elsewhere.exists()  # never touched
    mv = client.get_model_version("blip-filter", out["version"])
    assert mv.source == client.get_logged_model(out["model_id"]).artifact_location and mv.run_id == run_id
    assert_untouched(client, run_id)

    score_shards(FilterConfig(device="cpu", progress=False), world / "filter", world / "gen" / "web" / "00000.tar",
                 None, tmp_path / "scores")
    stage = {r["key"]: r["itm_web"] for r in pq.read_table(tmp_path / "scores" / "00000.parquet").to_pylist()}
    df = shard_frame(world)
    p = mlflow.pyfunc.load_model(f"models:/blip-filter/{out['version']}").predict(df[["image", "text"]])
    assert all(0.0 <= v <= 1.0 for v in p)
    assert list(p) == pytest.approx([stage[k] for k in df["key"]], abs=1e-5)


def test_a_shard_pattern_is_a_dataset_too(world, store, tmp_path):
    """img2dataset users name shards by brace pattern: logged with the digest of the shards it names."""
    shards = tmp_path / "shards"
    shutil.copytree(world / "gen" / "web", shards)
    spec = f"{shards}/{{00000..00000}}.tar"
    run_id = new_run(client := store, tmp_path, "pattern")
    first = mlflow_datasets.log_datasets(client, run_id, [("web", spec, None, "input")])[0]
    assert first["source"] == spec and len(first["digest"]) == 32
    (shards / "00000.tar").write_bytes((shards / "00000.tar").read_bytes() + b"\0" * 512)
    second = mlflow_datasets.log_datasets(client, run_id, [("web", spec, None, "input")])[0]
    assert second["digest"] != first["digest"]
    with pytest.raises(FileNotFoundError, match="dataset 'web'"):
        mlflow_datasets.log_datasets(client, run_id, [("web", f"{shards}/{{00007..00008}}.tar", None, "input")])
    assert_untouched(client, run_id)
