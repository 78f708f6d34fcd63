"""The study (Tables 1-4, the Table 12 control, DataComp's ITC filter over seeds): verdicts, and one
smoke-size study end to end on a real DVC repository and MLflow store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pipeline_repo import make_repo, run

from blip import params as params_module
from blip.study import BASE, CELLS, SEED_KEYS, cell_sets, cells_for, summarize, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_verdict_needs_the_sign_and_two_standard_errors():
    assert verdict([1.0, 1.2, 0.9]) == "reproduced"
    assert verdict([-1.0, -1.2, -0.9]) == "not reproduced"
    assert verdict([1.0, -1.0, 0.5]) == "inconclusive"
    assert verdict([3.0]) == "inconclusive (one seed)"


def test_cells_set_every_factor_and_every_seed():
    both = next(c for c in CELLS if c.name == "both")
    sets = cell_sets(both, 2, baseline_steps=564)
    assert {k: sets[k] for k in BASE} == BASE and all(sets[k] == 2 for k in SEED_KEYS)
    equal = next(c for c in CELLS if c.name == "equal-steps")
    equal_sets = cell_sets(equal, 0, baseline_steps=564)
    assert equal_sets["repretrain.max_steps"] == 564 and equal_sets["repretrain.epochs"] >= 564  # steps decide
    with pytest.raises(RuntimeError, match="baseline's pre-training steps"):
        cell_sets(equal, 0, baseline_steps=None)
    assert {c.name for c in cells_for(["3"])} == {"sa", "all", "ca", "no-sharing"}


@pytest.mark.parametrize("variant", [None, "quick", "smoke"])
def test_every_key_a_cell_sets_is_in_the_params_file(variant):
    """`dvc exp run -S key=value` refuses a key the file lacks, so each must exist in params.yaml
    (and stay there after each size's overlay)."""
    raw = params_module.read(ROOT / "params.yaml")
    if variant:
        overlay = params_module.read(params_module.variant_path(ROOT / "params.yaml", variant))
        raw = params_module.apply_overrides(raw, overlay)
    for key in [*BASE, *SEED_KEYS]:
        section, name = key.split(".")
        assert name in raw.get(section, {}), f"{key} is missing from params.yaml ({variant or 'full'})"


def test_each_cell_starts_from_the_committed_params(tmp_path):
    """`dvc exp run -S` leaves its edits in the workspace: a cell must not inherit the previous
    cell's keys (Table 12's unbounded repretrain.epochs once leaked into the next cell)."""
    import subprocess

    from blip.study import reset_params

    for name in ("params.yaml", "params-quick.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=tmp_path, check=True)
    params_module.edit(tmp_path / "params.yaml", {"repretrain.epochs": 1000})
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)  # dvc exp run stages its edits
    reset_params(tmp_path, "full")
    assert params_module.read(tmp_path / "params.yaml")["repretrain"]["epochs"] == 3
    params_module.edit(tmp_path / "params.yaml", {"repretrain.epochs": 1000})
    reset_params(tmp_path, "quick")
    quick = params_module.read(tmp_path / "params-quick.yaml")["repretrain"]["epochs"]
    assert params_module.read(tmp_path / "params.yaml")["repretrain"]["epochs"] == quick


def test_summary_pairs_seeds_and_judges_each_claim():
    rows = []
    for seed in (0, 1, 2):
        rows += [{"cell": "both", "seed": seed, "metrics": {"test/r_mean": 50 + seed, "dataset/noise_ratio": 0.3}},
                 {"cell": "beam", "seed": seed, "metrics": {"test/r_mean": 45 + seed, "dataset/noise_ratio": 0.2}},
                 {"cell": "itc", "seed": seed, "metrics": {"test/r_mean": 49 + seed}}]
    s = summarize(rows, ["2", "datacomp"])
    assert s["cells"]["both"]["test/r_mean"] == [50, 51, 52]
    by = {(c["better"], c["worse"], c["metric"]): c for c in s["comparisons"]}
    assert by[("both", "beam", "test/r_mean")]["diffs"] == [5, 5, 5]
    assert by[("both", "beam", "test/r_mean")]["verdict"] == "reproduced"  # the same +5 on every seed
    assert by[("both", "itc", "test/r_mean")]["verdict"] == "compare"


def test_report_only_writes_the_tables_from_the_rows_and_runs_nothing(tmp_path):
    from blip.study import main

    rows = [{"cell": c, "seed": seed, "seconds": 60.0, "metrics": {"test/r_mean": r + seed}}
            for seed in (0, 1) for c, r in (("both", 40.0), ("beam", 38.0))]
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--root", str(tmp_path), "--report-only", "--no-mlflow", "--tables", "2"]) == 0
    md = (tmp_path / "docs" / "study.md").read_text()
    assert "| both | 40.50 ± 0.71 |" in md and "| +2.00, +2.00 |" in md
    assert (tmp_path / "docs" / "study-table-2.png").is_file()
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "dvc.yaml").exists()  # nothing ran
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path / "empty"), "--report-only", "--no-mlflow"])


@pytest.mark.pipeline
def test_smoke_study_runs_dvc_experiments_and_writes_the_tables(tmp_path):
    repo = make_repo(tmp_path / "repo", variant=None)
    p = run([sys.executable, "-m", "blip.study", "--size", "smoke", "--tables", "2", "--seeds", "0",
             "--root", str(repo)], repo, timeout=1500)
    rows = [json.loads(line) for line in (repo / "study/results.jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in rows) == ["beam", "both"]
    assert len({r["experiment"] for r in rows}) == 2
    beam = next(r for r in rows if r["cell"] == "beam")
    assert beam["sets"]["capfilt.decoding"] == "beam" and "dataset/noise_ratio" in beam["metrics"]
    assert beam["metrics"]["repretrain/steps"] > 0 and beam["metrics"]["pretrain/steps"] == 6  # the smoke cap
    exps = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert {r["experiment"] for r in rows} <= set(exps)
    md = (repo / "docs/study.md").read_text()
    assert "| both |" in md and "Table 2: nucleus beats beam downstream" in md and "inconclusive (one seed)" in md
    assert (repo / "docs/study-table-2.png").stat().st_size > 1000
    # resumable: a second call runs nothing new
    again = run([sys.executable, "-m", "blip.study", "--size", "smoke", "--tables", "2", "--seeds", "0",
                 "--root", str(repo), "--no-mlflow"], repo, timeout=600)
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]  # no dvc command
    assert len((repo / "study/results.jsonl").read_text().splitlines()) == 2
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("blip-bootstrap")
    study = client.search_runs([exp.experiment_id], filter_string="tags.`blip.role` = 'study'")
    assert len(study) == 1 and "both/test/r_mean/mean" in study[0].data.metrics
    assert {a.path for a in client.list_artifacts(study[0].info.run_id)} >= {"study.md", "study-table-2.png"}
    assert "+ " in p.stdout
    # Table 3 is about the baseline alone: its cells run the stages up to evaluate@baseline, no CapFilt
    # (one of its three such cells here: they differ only in model.sharing)
    t3 = run([sys.executable, "-m", "blip.study", "--size", "smoke", "--tables", "3", "--cells", "sa", "all",
              "--seeds", "0", "--root", str(repo), "--no-mlflow"], repo, timeout=1500)
    rows = {r["cell"]: r for r in map(json.loads, (repo / "study/results.jsonl").read_text().splitlines())}
    assert set(rows) == {"both", "beam", "sa", "all"}
    assert rows["sa"]["experiment"] == rows["both"]["experiment"]  # BLIP's sharing: the default run, reused
    assert rows["all"]["experiment"].endswith("-baseline") and "test/r_mean" in rows["all"]["metrics"]
    assert rows["all"]["sets"]["model.sharing"] == "all" and "capfilt" not in rows["all"]["both_sides"]
    assert "Running stage 'pretrain'" in t3.stdout and "Running stage 'repretrain'" not in t3.stdout
    assert "Table 3: all-except-SA beats sharing all" in (repo / "docs/study.md").read_text()
    bad = run([sys.executable, "-m", "blip.study", "--tables", "3", "--cells", "beam", "--root", str(repo)], repo,
              check=False)
    assert bad.returncode == 2 and "--cells beam: not a cell of tables 3" in bad.stderr
