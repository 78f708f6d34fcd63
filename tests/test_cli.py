"""The stage command line: every stage has --help; bad params fail naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from blip import params as params_module
from blip.cli import main
from blip.params import TRAIN_SECTIONS, ParamsError, apply_overrides, parse_overrides
from blip.train.config import TrainConfig

STAGES = ["data", "warmstart_vision", "tokenizer", "warmstart_text", "pretrain", "finetune_captioner", "finetune_filter",
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
    params = params_module.load("params.yaml")
    for sec in TRAIN_SECTIONS:
        assert isinstance(params.train(sec), TrainConfig) and params.train(sec).job == sec
    # the smoke variant overlays cleanly and keeps the file's comments
    (tmp_path / "params.yaml").write_text(Path("params.yaml").read_text())
    (tmp_path / "params-smoke.yaml").write_text(Path("params-smoke.yaml").read_text())
    smoke = params_module.apply_variant(tmp_path / "params.yaml", "smoke")
    assert smoke.pretrain.max_steps == 6 and smoke.pretrain.lr == params.pretrain.lr
    assert "# Table 1: none | filter | captioner | both" in (tmp_path / "params.yaml").read_text()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("capfilt.parts", "some", "parts='some' unknown; use one of ('none', 'filter', 'captioner', 'both')"),
        ("capfilt.decoding", "greedy", "decoding='greedy' unknown; use one of ('nucleus', 'beam')"),
        ("capfilt.models", "tied", "models='tied' unknown; use one of ('decoupled', 'shared')"),
        ("caption.method", "beam", "caption.method is set by capfilt.decoding"),
        ("evaluate.k_test", "many", "evaluate.k_test='many': expected int"),
        ("evaluate.bf16", "half", "bf16='half': use auto, true or false"),
        ("pretrain.vision_lr_scale", -1, "vision_lr_scale=-1: the ViT's lr as a fraction of lr, in [0, 10]"),
        ("nonsense.key", 1, "unknown section 'nonsense'"),
        ("compute.nproc_per_node", 0, "nproc_per_node=0: an integer >= 1 or 'auto'"),
        ("pretrain.job", "finetune_filter", "pretrain.job is set by the section's name"),
        ("finetune_retrieval.epochs", 2, "unknown section 'finetune_retrieval'"),
    ],
)
def test_params_file_edits_are_validated_before_writing(tmp_path, key, value, message):
    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(ParamsError, match=re.escape(message)):
        params_module.edit(path, {key: value})
    assert path.read_text() == before
    with pytest.raises(ParamsError, match="variant 'nope'"):
        params_module.apply_variant(path, "nope")


def test_derived_stage_configs_follow_the_capfilt_factors():
    params = params_module.load("params.yaml", ["capfilt.parts=filter", "capfilt.decoding=beam"])
    assert params.caption.method == "beam"
    a = params.assemble
    assert (a.use_filter, a.use_captioner, a.parts) == (True, False, "filter")
    assert params.factors() == {"capfilt.parts": "filter", "capfilt.decoding": "beam", "capfilt.models": "decoupled",
                                "model.sharing": "all_except_sa"}
    assert params.raw["capfilt"]["parts"] == "filter"  # what MLflow records: the file plus the overrides


def test_overrides_parse_yaml_values():
    p = {"a": {"b": 1}}
    apply_overrides(p, parse_overrides(["a.b=2.5", "a.c={depth: 2}", "a.d=[x, y]", "e.f=true"]))
    assert p == {"a": {"b": 2.5, "c": {"depth": 2}, "d": ["x", "y"]}, "e": {"f": True}}
    apply_overrides(p, {"a": {"c": {"width": 3}}})  # a nested dict merges into the section
    assert p["a"]["c"] == {"depth": 2, "width": 3}
    for bad in ("nonsense", "novalue", "=3"):
        with pytest.raises(ParamsError, match="section.key=value"):
            parse_overrides([bad])


def test_exponent_learning_rates_are_floats(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; a float field takes it as the number everyone means."""
    p = params_module.load("params.yaml", ["finetune_filter.lr=1e-4", "pretrain.min_lr=3E-6"])
    assert p.finetune_filter.lr == pytest.approx(1e-4) and p.pretrain.min_lr == pytest.approx(3e-6)
    with pytest.raises(ParamsError, match="finetune_filter.lr='fast'"):
        params_module.load("params.yaml", ["finetune_filter.lr=fast"])
    with pytest.raises(ParamsError, match="parts='1e-4' unknown"):
        params_module.load("params.yaml", ["capfilt.parts=1e-4"])  # a str field keeps its string (and is checked)


def test_pretrain_on_a_mistyped_folder_fails_naming_it_before_any_work(capsys, tmp_path):
    """`--shards <typo> data/generated/human` used to train on the human split alone."""
    real = tmp_path / "human"
    real.mkdir()
    (real / "00000.tar").write_bytes(b"")  # never read: the typo stops the stage first
    from blip.tokenizer import build_tokenizer

    build_tokenizer(["a red square left of a blue circle"] * 20, vocab_size=120).save(tmp_path / "tok")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--shards", str(tmp_path / "genrated" / "web"), str(real), "--out", str(tmp_path / "o"),
              "--tokenizer", str(tmp_path / "tok"), "--set", "mlflow.enabled=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "genrated/web' does not exist" in err and "check the path" in err
    assert not (tmp_path / "o").exists()


def test_paper_variant_is_blips_recipe_whatever_the_embedded_defaults(tmp_path):
    """The embedded defaults lock the ViT, draw ITM negatives uniformly and train on images that are
    neither cropped nor augmented (chosen on val for a tiny model beside a warm ViT); the `paper`
    overlay must undo every such choice, key by key."""
    (tmp_path / "params.yaml").write_text(Path("params.yaml").read_text())
    (tmp_path / "params-paper.yaml").write_text(Path("params-paper.yaml").read_text())
    paper = params_module.apply_variant(tmp_path / "params.yaml", "paper")
    for section in ("pretrain", "repretrain", "finetune_captioner", "finetune_filter", "finetune_shared"):
        assert paper.train(section).vision_lr_scale == 1.0, section
    for section in ("pretrain", "repretrain", "finetune_filter", "finetune_shared"):
        assert paper.train(section).itm_negatives == "hard", section
        assert paper.train(section).itm_negatives_from == "batch", section
    for section, min_scale in (("pretrain", 0.2), ("repretrain", 0.2), ("finetune_captioner", 0.5),
                               ("finetune_filter", 0.5), ("finetune_shared", 0.5)):  # BLIP's crops, flips, RandomAugment
        assert (paper.train(section).augment, paper.train(section).min_scale) == (True, min_scale), section
    assert (paper.pretrain.lr, paper.finetune_captioner.lr, paper.finetune_filter.lr) == (3e-4, 1e-5, 1e-5)
    assert (paper.finetune_captioner.min_scale, paper.caption.max_length, paper.evaluate.k_test) == (0.5, 20, 256)
    assert not paper.warmstart_vision.enabled
