"""The stage command line: every stage has --help; bad params fail naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from blip.cli import main
from blip.params import ParamsError, apply_override, load_params
from blip.schema import train_config
from blip.train import TrainConfig

STAGES = ["data", "tokenizer", "pretrain", "finetune_captioner", "finetune_filter", "finetune_retrieval",
          "finetune_shared", "repretrain", "downstream_captioner", "downstream_retrieval", "caption", "filter",
          "assemble", "evaluate", "filter_quality", "report", "params"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    assert "--params" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.epoch=3", "unknown key pretrain.epoch"),
        ("pretrain.epochs=abc", "pretrain.epochs='abc': expected int"),
        ("pretrain.schedule=linear", "schedule='linear' unknown"),
        ("model.sharing=some", "sharing='some' unknown; use one of"),
    ],
)
def test_bad_params_fail_before_any_work_naming_the_key(override, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--set", override, "--shards", str(tmp_path), "--out", str(tmp_path / "o"),
              "--tokenizer", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_repository_params_files_are_valid(tmp_path):
    from blip.pipeline import paramsfile
    from blip.schema import TRAIN_SECTIONS, validate

    params = load_params("params.yaml")
    validate(params)
    for sec in TRAIN_SECTIONS:
        assert isinstance(train_config(params, sec), TrainConfig)
    # the smoke variant overlays cleanly and keeps the file's comments
    (tmp_path / "params.yaml").write_text(Path("params.yaml").read_text())
    (tmp_path / "params-smoke.yaml").write_text(Path("params-smoke.yaml").read_text())
    smoke = paramsfile.apply_variant(tmp_path / "params.yaml", "smoke")
    assert smoke["pretrain"]["max_steps"] == 6 and smoke["pretrain"]["lr"] == params["pretrain"]["lr"]
    assert "# Table 1: none | filter | captioner | both" in (tmp_path / "params.yaml").read_text()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("capfilt.parts", "some", "parts='some' unknown; use one of ('none', 'filter', 'captioner', 'both')"),
        ("capfilt.decoding", "greedy", "decoding='greedy' unknown; use one of ('nucleus', 'beam')"),
        ("capfilt.models", "tied", "models='tied' unknown; use one of ('decoupled', 'shared')"),
        ("caption.method", "beam", "caption.method is set by capfilt.decoding"),
        ("evaluate.k_test", "many", "evaluate.k_test='many': expected int"),
        ("nonsense.key", 1, "unknown section 'nonsense'"),
        ("compute.nproc_per_node", 0, "nproc_per_node=0: an integer >= 1 or 'auto'"),
    ],
)
def test_params_file_edits_are_validated_before_writing(tmp_path, key, value, message):
    from blip.pipeline import paramsfile

    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(ParamsError, match=re.escape(message)):
        paramsfile.set_params(path, {key: value})
    assert path.read_text() == before
    with pytest.raises(ParamsError, match="variant 'nope'"):
        paramsfile.apply_variant(path, "nope")


def test_derived_stage_configs_follow_the_capfilt_factors():
    from blip.schema import assemble_config, caption_config

    params = load_params("params.yaml", ["capfilt.parts=filter", "capfilt.decoding=beam"])
    assert caption_config(params).method == "beam"
    a = assemble_config(params)
    assert (a.use_filter, a.use_captioner, a.parts) == (True, False, "filter")


def test_overrides_parse_yaml_values():
    p = {"a": {"b": 1}}
    apply_override(p, "a.b=2.5")
    apply_override(p, "a.c={depth: 2}")
    apply_override(p, "a.d=[x, y]")
    assert p == {"a": {"b": 2.5, "c": {"depth": 2}, "d": ["x", "y"]}}
    with pytest.raises(ParamsError, match="section.key=value"):
        apply_override(p, "nonsense")
