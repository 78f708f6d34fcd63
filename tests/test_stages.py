"""The stage registry is the one list of stages: dvc.yaml, the CLI and the params agree with it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blip import params as params_module
from blip.stages.registry import STAGES
from blip.train.config import JOBS

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _cmd(entry: dict) -> list[str]:
    return shlex.split((entry.get("do") or entry)["cmd"])


def test_dvc_yaml_and_the_registry_name_the_same_stages():
    assert set(DVC) == set(STAGES)
    for name, entry in DVC.items():
        cmd = _cmd(entry)
        assert cmd[:4] == ["python", "-m", "blip", name], f"dvc.yaml stage {name} must run `python -m blip {name}`"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_params_are_what_the_stage_reads(name):
    """DVC reruns a stage when a key it lists changes: the list must be exactly what the stage reads."""
    entry = DVC[name].get("do") or DVC[name]
    assert set(entry.get("params") or []) == set(STAGES[name].reads)
    params = params_module.read(ROOT / "params.yaml")
    for key in STAGES[name].reads:  # every key read exists in params.yaml
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name} reads {key}, which params.yaml lacks"
            node = node[part]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_reading_a_derived_key_lists_the_factor_it_comes_from(name):
    """``assemble.score`` is derived from ``capfilt.filter_score``: a stage that reads the section
    must list the factor too, or DVC reuses its output when only the factor changed (the study's
    ITC cell once re-used the ITM cell's dataset)."""
    reads = set(STAGES[name].reads)
    for key, factor in params_module.DERIVED.items():
        if key.split(".")[0] in reads and "." in factor and " " not in factor:
            assert factor in reads or factor.split(".")[0] in reads, f"{name} reads {key}, derived from {factor}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_commands_use_only_the_stage_options(name):
    stage = STAGES[name]
    options = {f"--{a.name}" for a in stage.args} | {"--run-name", "--params", "--set"}
    given = {tok for tok in _cmd(DVC[name]) if tok.startswith("--")}
    assert given <= options, f"{name}: dvc.yaml passes {sorted(given - options)}, which the stage does not take"
    required = {f"--{a.name}" for a in stage.args if a.required}
    assert required <= given, f"{name}: dvc.yaml misses required {sorted(required - given)}"


def test_training_stages_train_a_known_job_of_a_params_section():
    training = {s.name: s for s in STAGES.values() if s.trains}
    assert set(training) == {"pretrain", "finetune_captioner", "finetune_filter", "finetune_shared", "repretrain",
                             "downstream_captioner", "downstream_retrieval"}
    assert {s.section for s in training.values()} == set(params_module.TRAIN_SECTIONS) == set(JOBS)
    # the CapFilt model is fine-tuned exactly as the baseline's: same sections, same classes
    assert STAGES["downstream_captioner"].section == STAGES["finetune_captioner"].section
    assert STAGES["downstream_retrieval"].model_class == STAGES["finetune_filter"].model_class == "BlipRetrieval"
    assert STAGES["repretrain"].model_class == STAGES["pretrain"].model_class == "BlipPretrain"
    # every params section is read by some stage (none lies unused in params.yaml)
    read = {key.split(".")[0] for s in STAGES.values() for key in s.reads}
    assert set(params_module.read(ROOT / "params.yaml")) - read <= {"data", "mlflow"}  # paths and tracking


def test_the_registered_models_are_the_captioner_and_the_filter():
    registered = {(s.name, m.role, m.register) for s in STAGES.values() for m in s.models if m.register}
    assert registered == {("finetune_captioner", "captioner", "blip-captioner"), ("finetune_filter", "filter", "blip-filter"),
                          ("finetune_shared", "captioner", "blip-captioner"), ("finetune_shared", "filter", "blip-filter")}


def test_light_stages_do_not_import_torch():
    """The light stages' command path (CLI, params, registry, tracking) imports neither torch nor mlflow."""
    code = ("import sys, blip.cli, blip.pipeline.tracking, blip.stages.registry; "
            "blip.params.load('params.yaml'); heavy = {'torch', 'mlflow', 'timm'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
