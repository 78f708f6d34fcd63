"""The stage command line: every stage has --help; bad params fail naming the key."""

from __future__ import annotations

import pytest

from blip.cli import main
from blip.params import ParamsError, apply_override, build, load_params
from blip.train import TrainConfig

STAGES = ["tokenizer", "pretrain", "finetune_captioner", "finetune_filter", "finetune_retrieval", "finetune_shared",
          "repretrain", "caption", "filter", "assemble", "evaluate", "filter_quality", "report"]


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


def test_repository_params_file_is_valid():
    from blip.capfilt import AssembleConfig, CaptionConfig, FilterConfig
    from blip.cli import EvaluateParams, ModelParams, train_config
    from blip.data import GenerateConfig

    params = load_params("params.yaml")
    for stage in ("pretrain", "finetune_captioner", "finetune_filter", "finetune_retrieval", "finetune_shared",
                  "repretrain"):
        assert isinstance(train_config(params, stage), TrainConfig)
    for cls, name in [(ModelParams, "model"), (GenerateConfig, "data"), (CaptionConfig, "caption"),
                      (FilterConfig, "filter"), (AssembleConfig, "assemble"), (EvaluateParams, "evaluate")]:
        build(cls, params[name], name)


def test_overrides_parse_yaml_values():
    p = {"a": {"b": 1}}
    apply_override(p, "a.b=2.5")
    apply_override(p, "a.c={depth: 2}")
    apply_override(p, "a.d=[x, y]")
    assert p == {"a": {"b": 2.5, "c": {"depth": 2}, "d": ["x", "y"]}}
    with pytest.raises(ParamsError, match="section.key=value"):
        apply_override(p, "nonsense")
