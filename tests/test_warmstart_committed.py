"""The committed vision warm start (shipped as BLIP ships DeiT): the files in
``models/warmstart_vision`` are what ``dvc.lock`` pins, they were made for today's world and
model, they load, and a fresh checkout's ``dvc repro`` verifies them instead of retraining."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_repo import PROJECT, run

from blip.model.blip import BlipPretrain
from blip.params import load as load_params
from blip.train.warmstart import CARD, WEIGHTS, check_vision_init, load_vision_init

WARM = PROJECT / "models" / "warmstart_vision"
STAGE = "warmstart_vision"


def _lock_out(path: str) -> dict:
    lock = yaml.safe_load((PROJECT / "dvc.lock").read_text())
    return next(o for o in lock["stages"][STAGE]["outs"] if o["path"] == path)


def _dir_md5(directory: Path) -> tuple[str, int, int]:
    """DVC's own hash of a folder (``dvc_data``'s tree digest, as ``dvc.lock`` records it)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(directory.parent / ".md5-scratch"))
    try:
        _, meta, obj = build(odb, str(directory), fs, "md5")
        return obj.hash_info.value, meta.nfiles, meta.size
    finally:
        shutil.rmtree(directory.parent / ".md5-scratch", ignore_errors=True)


def test_dvc_yaml_ships_the_warm_start_frozen_and_in_git():
    stage = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"][STAGE]
    assert stage["frozen"] is True  # an unrelated change never re-runs the long job
    assert stage["outs"] == [{"models/warmstart_vision": {"cache": False}}]  # git tracks the files
    tracked = run(["git", "ls-files", "models/warmstart_vision"], PROJECT).stdout.split()
    assert sorted(tracked) == [f"models/warmstart_vision/{CARD}", f"models/warmstart_vision/{WEIGHTS}"]


def test_the_committed_files_are_what_dvc_lock_pins(tmp_path):
    out = _lock_out("models/warmstart_vision")
    copy = tmp_path / "warmstart_vision"
    shutil.copytree(WARM, copy)
    md5, nfiles, size = _dir_md5(copy)
    assert (md5, nfiles, size) == (out["md5"], out["nfiles"], out["size"])
    (copy / CARD).write_text((copy / CARD).read_text() + " ")  # the check can fail
    assert _dir_md5(copy)[0] != out["md5"]


def test_the_committed_warm_start_fits_todays_world_and_model_and_loads():
    params = load_params(PROJECT / "params.yaml")
    card = json.loads((WARM / CARD).read_text())
    vision = params.model.config({}).vision
    check_vision_init(WARM, params.generate.world, vision)  # made for this world and this ViT
    assert card["warmstart"] == {k: v for k, v in yaml.safe_load((PROJECT / "params.yaml").read_text())[STAGE].items()
                                 if k != "progress"}  # and by these params
    model = BlipPretrain(params.model.config({}))
    load_vision_init(model, WARM)
    metrics = json.loads((PROJECT / "metrics" / "train" / f"{STAGE}.json").read_text())
    assert metrics["held_out"] == card["held_out"] and metrics["steps"] == card["steps"]


@pytest.mark.pipeline
def test_a_fresh_checkout_verifies_the_frozen_warm_start_instead_of_training_it(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore"):
        shutil.copy2(PROJECT / name, repo / name)
    shutil.copytree(WARM, repo / "models" / "warmstart_vision")
    (repo / "metrics" / "train").mkdir(parents=True)
    shutil.copy2(PROJECT / "metrics" / "train" / f"{STAGE}.json", repo / "metrics" / "train")
    run(["git", "init", "-q", "-b", "main"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    p = run([sys.executable, "-m", "dvc", "repro", "--single-item", STAGE], repo)
    # dvc.lock's md5 matches the files: up to date (a checkout without the lock entry would say
    # "Verifying outputs in frozen stage" — test_pipeline_dvc); either way the command never runs
    assert "Running stage" not in p.stdout and f"Stage '{STAGE}' didn't change, skipping" in p.stdout
    assert "is frozen" in p.stderr
    assert json.loads(run([sys.executable, "-m", "dvc", "status", STAGE, "--json"], repo).stdout) == {}
    (repo / "models" / "warmstart_vision" / CARD).write_text("{}")  # damaged files are not silently accepted
    assert STAGE in json.loads(run([sys.executable, "-m", "dvc", "status", STAGE, "--json"], repo).stdout)
    assert _lock_out("models/warmstart_vision") == next(
        o for o in yaml.safe_load((repo / "dvc.lock").read_text())["stages"][STAGE]["outs"]
        if o["path"] == "models/warmstart_vision")
