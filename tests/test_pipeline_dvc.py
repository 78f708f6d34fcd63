"""The DVC graph for real: ``dvc repro`` of the whole loop on the smoke params in a fresh git repo,
a no-op second repro, ``dvc metrics/plots/exp show``, an ablation with ``dvc exp run -S`` that
reruns only what depends on the factor, the MLflow runs the stages wrote (client API) — then,
with that first run as the reference, kill anywhere, lose nothing (``kill_anywhere.py``).
Slow: ~10.5 min in CI beside the other worker (2 cores)."""

from __future__ import annotations

import json
import re
import shutil
import sys

import kill_anywhere
import pytest
import yaml
from pipeline_repo import make_repo, run

pytestmark = pytest.mark.pipeline

# warmstart_vision is frozen: its committed weights are verified, never retrained (test_warmstart_committed)
ALL_STAGES = {"data", "tokenizer", "warmstart_text", "pretrain", "finetune_captioner", "finetune_filter",
              "finetune_shared", "caption", "filter", "assemble", "filter_quality", "repretrain",
              "downstream_captioner", "downstream_retrieval", "evaluate@baseline", "evaluate@capfilt", "report"}
# what may depend on capfilt.decoding: the synthetic captions and everything built from them
DECODING_DOWNSTREAM = {"caption", "filter", "assemble", "filter_quality", "repretrain", "downstream_captioner",
                       "downstream_retrieval", "evaluate@capfilt", "report"}


def dvc(repo, *args, **kw):
    return run([sys.executable, "-m", "dvc", *args], repo, **kw)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def lock_md5(repo, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


@pytest.mark.slow
def test_dvc_repro_loop_then_nothing_then_only_what_a_factor_touches_then_killed_in_each_long_stage(tmp_path):
    repo = make_repo(tmp_path / "repo")

    first = dvc(repo, "repro")
    assert ran_stages(first.stdout) == ALL_STAGES
    # a log a person can read: no progress bar redrawn with \r into one endless line (under a pipe
    # every bar prints plain lines, blip/data/progress.py), no stage summary on one line; DVC's echo
    # of a stage's command ("> python -m blip report ...") is dvc.yaml's, not a log line
    long_lines = [line for line in re.split(r"[\r\n]", first.stdout + first.stderr)
                  if len(line) >= 300 and not line.startswith("> ")]
    assert long_lines == [], f"{len(long_lines)} log lines of 300+ characters, e.g. {long_lines[0][:200]!r}"
    assert "Verifying outputs in frozen stage: 'warmstart_vision'" in first.stdout + first.stderr
    reference = kill_anywhere.reference(repo)
    for out in ["models/captioner/model.safetensors", "models/filter/model.safetensors",
                "models/repretrain/model.safetensors", "models/shared/SKIPPED.json", "report.md",
                "models/warmstart_vision/vision.safetensors", "metrics/train/warmstart_vision.json",
                "models/warmstart_text/text.safetensors", "metrics/train/warmstart_text.json"]:
        assert (repo / out).is_file(), out
    assert sorted(p.name for p in (repo / "data/capfilt/captions").glob("*.parquet")) == \
        ["00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"]
    report = json.loads((repo / "metrics/report.json").read_text())
    assert set(report) >= {"baseline", "capfilt", "dataset", "filter_quality", "dataset_md5"}
    assert "test/r_mean" in report["baseline"] and "test/Bleu_4" in report["capfilt"]
    ds = report["dataset"]
    web = ds["sources"]["web"]
    assert web["input"] == 48 and web["kept"] + web["dropped"] == 48  # every web text accounted for
    assert report["dataset_md5"] == lock_md5(repo, "data/capfilt/dataset")
    md = (repo / "report.md").read_text()
    assert "| test/r_mean |" in md
    assert re.search(r"\| pretrain \| \d+\.\d \|", md)  # stage wall times from the MLflow child runs

    # every dataset and checkpoint is versioned in dvc.lock
    for out in ["data/generated", "models/warmstart_vision", "models/warmstart_text", "models/tokenizer",
                "models/pretrain", "models/captioner", "models/filter",
                "data/capfilt/captions", "data/capfilt/scores", "data/capfilt/dataset", "models/repretrain"]:
        assert lock_md5(repo, out).endswith(".dir"), out

    lock_before = (repo / "dvc.lock").read_text()
    second = dvc(repo, "repro")
    assert ran_stages(second.stdout) == set()
    assert "Data and pipelines are up to date." in second.stdout
    assert (repo / "dvc.lock").read_text() == lock_before

    metrics = dvc(repo, "metrics", "show", "--json")
    shown = json.loads(metrics.stdout)
    flat = json.dumps(shown)
    assert "metrics/evaluate_capfilt.json" in flat and "r_mean" in flat
    dvc(repo, "plots", "show", "-o", "dvc_plots")
    html = (repo / "dvc_plots/index.html").read_text()
    assert "pre-training losses" in html and "plots/pretrain.csv" in html

    _check_mlflow(repo)

    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "smoke loop"], repo)
    captions_before = lock_md5(repo, "data/capfilt/captions")
    pretrain_before = lock_md5(repo, "models/pretrain")
    exp = dvc(repo, "exp", "run", "-S", "capfilt.decoding=nucleus")  # the committed decoding is beam
    ran = ran_stages(exp.stdout)
    # only what reads the captions reruns; DVC stops early where an output comes out identical
    # (the smoke filter may drop every text under both decodings: same dataset, same models)
    assert {"caption", "filter", "assemble"} <= ran <= DECODING_DOWNSTREAM, ran
    assert yaml.safe_load((repo / "params.yaml").read_text())["capfilt"]["decoding"] == "nucleus"
    assert lock_md5(repo, "models/pretrain") == pretrain_before
    assert lock_md5(repo, "data/capfilt/captions") != captions_before
    shown = dvc(repo, "exp", "show", "--no-pager", "--csv").stdout
    assert "capfilt.decoding" in shown and "beam" in shown and "nucleus" in shown

    # Table 4 "shared" + Table 1 "captioner only": one fine-tuned model captions and scores,
    # nothing is filtered out
    exp = dvc(repo, "exp", "run", "-S", "capfilt.models=shared", "-S", "capfilt.parts=captioner")
    ran = ran_stages(exp.stdout)
    assert {"finetune_shared", "caption", "filter", "assemble"} <= ran
    assert not ran & {"pretrain", "finetune_captioner", "finetune_filter", "evaluate@baseline"}
    assert (repo / "models/shared/model.safetensors").is_file()
    stats = json.loads((repo / "metrics/dataset.json").read_text())
    assert stats["parts"] == "captioner"
    assert {k: v["dropped"] for k, v in stats["sources"].items()} == {"human": 0, "web": 0, "synthetic": 0}
    assert stats["sources"]["synthetic"]["kept"] == 48

    # kill anywhere, lose nothing: the same loop in the same folder, SIGKILLed inside each long stage
    shutil.rmtree(repo)
    make_repo(repo)
    kill_anywhere.kill_each_long_stage_then_finish(repo, *reference)


def _check_mlflow(repo) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("blip-bootstrap")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("blip.role") == "bootstrap"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"  # the report stage ended the bootstrap run
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == ALL_STAGES
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    tags = parent.data.tags
    assert tags["git.commit"] == head
    assert tags["dvc.dataset_md5"] == lock_md5(repo, "data/capfilt/dataset")
    assert {tags[k] for k in ("capfilt.parts", "capfilt.decoding", "capfilt.models", "model.sharing")} == \
        {"both", "beam", "decoupled", "all_except_sa"}
    assert parent.data.params["pretrain.max_steps"] == "6" and parent.data.params["capfilt.decoding"] == "beam"
    assert "capfilt/test/r_mean" in parent.data.metrics and "baseline/test/CIDEr" in parent.data.metrics

    pre = children["pretrain"]
    history = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    import yaml

    assert pre.data.params["pretrain.lr"] == str(yaml.safe_load((repo / "params.yaml").read_text())["pretrain"]["lr"])
    for stage, expected in [("finetune_captioner", {"model", "model-hf"}), ("finetune_filter", {"model"}),
                            ("repretrain", {"model"}), ("downstream_captioner", {"model", "model-hf"})]:
        arts = {a.path for a in client.list_artifacts(children[stage].info.run_id)}
        assert expected <= arts, (stage, arts)
    files = {a.path for a in client.list_artifacts(children["finetune_captioner"].info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json"} <= files
    hf = {a.path for a in client.list_artifacts(children["finetune_captioner"].info.run_id, "model-hf")}
    assert "model-hf/config.json" in hf
    assert children["evaluate@capfilt"].data.metrics["test/r_mean"] >= 0

    # the runs table's Dataset column: what each stage read and wrote, with DVC's versions as digests
    def inputs(stage):
        return {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context")): d.dataset.digest
                for d in client.get_run(children[stage].info.run_id).inputs.dataset_inputs}

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    web_md5 = next(d["md5"] for d in lock["tokenizer"]["deps"] if d["path"] == "data/generated/web")
    # one version per dataset, whichever stage logs it: the md5 DVC records
    assert inputs("data")[("web", "output")] == inputs("pretrain")[("web", "training")] == web_md5
    assert inputs("assemble")[("bootstrapped", "output")] == inputs("repretrain")[("bootstrapped", "training")] \
        == lock_md5(repo, "data/capfilt/dataset")
    assert {("human", "input"), ("web", "input")} <= set(inputs("assemble"))
    assert {("test", "evaluation"), ("zeroshot", "evaluation")} <= set(inputs("evaluate@capfilt"))
    # the captioner and the filter as registered model versions tagged with the bootstrap's factors
    for name, stage in (("blip-captioner", "finetune_captioner"), ("blip-filter", "finetune_filter")):
        versions = client.search_model_versions(f"name = '{name}'")
        assert [v.run_id for v in versions] == [children[stage].info.run_id], name
        assert versions[0].tags["capfilt.parts"] == "both" and versions[0].tags["model.sharing"] == "all_except_sa"
