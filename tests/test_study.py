"""The study (Tables 1-4, the Table 12 control, DataComp's ITC filter over seeds): verdicts, and one
smoke-size study end to end on a real DVC repository and MLflow store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_repo import make_repo, run

from blip import params as params_module
from blip.evaluate.intervals import r_mean
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


def test_the_ceiling_cells_are_the_oracle_and_the_clean_world():
    cells = {c.name: c for c in cells_for(["ceiling"])}
    # and what they are compared with, the CapFilt cells at the baseline's steps among them
    assert set(cells) == {"oracle", "clean", "baseline", "none", "none-steps", "both", "equal-steps"}
    with pytest.raises(RuntimeError, match="pre-training steps"):
        cell_sets(cells["oracle"], 1, baseline_steps=None)
    oracle = cell_sets(cells["oracle"], 1, baseline_steps=580)
    assert oracle["capfilt.filter_score"] == "oracle" and oracle["capfilt.parts"] == "both"
    assert oracle["repretrain.max_steps"] == 580 == cell_sets(cells["none-steps"], 1, 580)["repretrain.max_steps"]
    assert cells["oracle"].measure == "capfilt"
    clean = cell_sets(cells["clean"], 1, baseline_steps=None)
    assert clean["generate.noise_rate"] == 0 and cells["clean"].measure == "baseline"
    assert {k: clean[k] for k in BASE} == BASE and all(clean[k] == 1 for k in SEED_KEYS)
    params_module.from_dict({"capfilt": {"filter_score": "oracle"}, "generate": {"noise_rate": 0}})  # valid values


@pytest.mark.parametrize("variant", [None, "quick", "smoke"])
def test_every_key_a_cell_sets_is_in_the_params_file(variant):
    """`dvc exp run -S key=value` refuses a key the file lacks, so each must exist in params.yaml
    (and stay there after each size's overlay)."""
    raw = params_module.read(ROOT / "params.yaml")
    if variant:
        overlay = params_module.read(params_module.variant_path(ROOT / "params.yaml", variant))
        raw = params_module.apply_overrides(raw, overlay)
    for key in [*BASE, *SEED_KEYS, *(k for c in CELLS for k in c.sets)]:
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
    committed = params_module.read(ROOT / "params.yaml")["repretrain"]["epochs"]
    reset_params(tmp_path, "full")
    assert params_module.read(tmp_path / "params.yaml")["repretrain"]["epochs"] == committed != 1000
    params_module.edit(tmp_path / "params.yaml", {"repretrain.epochs": 1000})
    reset_params(tmp_path, "quick")
    quick = params_module.read(tmp_path / "params-quick.yaml").get("repretrain", {}).get("epochs", committed)
    assert params_module.read(tmp_path / "params.yaml")["repretrain"]["epochs"] == quick


def test_summary_pairs_seeds_and_judges_each_claim():
    rows = []
    for seed in (0, 1, 2):
        rows += [{"cell": "both", "seed": seed, "metrics": {"test/r_mean": 50 + seed, "dataset/noise_ratio": 0.3}},
                 {"cell": "beam", "seed": seed, "metrics": {"test/r_mean": 45 + seed, "dataset/noise_ratio": 0.2}},
                 {"cell": "itc", "seed": seed, "metrics": {"test/r_mean": 49 + seed}},
                 {"cell": "baseline", "seed": seed, "metrics": {"test/r_mean": 40 + 2 * seed}}]
    s = summarize(rows, ["2", "datacomp"])
    assert s["cells"]["both"]["test/r_mean"] == [50, 51, 52]
    by = {(c["better"], c["worse"], c["metric"]): c for c in s["comparisons"]}
    assert by[("both", "beam", "test/r_mean")]["diffs"] == [5, 5, 5]
    assert by[("both", "beam", "test/r_mean")]["verdict"] == "reproduced"  # the same +5 on every seed
    assert by[("both", "itc", "test/r_mean")]["verdict"] == "compare"
    assert by[("beam", "baseline", "test/r_mean")]["diffs"] == [5, 4, 3]  # the default run's decoding, too
    assert by[("beam", "filter", "test/r_mean")]["verdict"] == "not run"  # Table 1's filter cell: no rows here


def _ranks(txt_ranks, n_img=100):
    """One split's ranks: image i's texts are 5i..5i+4, text→image ranks equal their image's rank."""
    txt = np.asarray(txt_ranks)
    return {"txt_ranks": txt.tolist(), "img_ranks": np.repeat(txt, 5).tolist(),
            "txt2img": np.repeat(np.arange(n_img), 5).tolist(), "image_ids": list(range(n_img))}


def _study(better: dict[int, np.ndarray], worse: dict[int, np.ndarray]):
    """Rows of Table 2's both (better) and beam (worse) cells with their ranks files' content."""
    rows, ranks = [], {}
    for seed in better:
        for cell, txt in (("both", better[seed]), ("beam", worse[seed])):
            exp = f"study-{cell}-s{seed}"
            split = _ranks(txt)
            rows.append({"cell": cell, "seed": seed, "experiment": exp,
                         "metrics": {"test/r_mean": r_mean(split), "dataset/noise_ratio": 0.2}})
            ranks[(exp, "capfilt")] = {"test": split}
    return rows, ranks


def test_the_verdict_uses_the_pooled_interval_where_every_seed_has_ranks():
    rng = np.random.default_rng(0)
    worse = {s: rng.integers(0, 20, size=100) for s in (0, 1, 2)}
    # one image fixed on every seed: the same +1.0 each time. The 2-SE rule calls that reproduced (no
    # spread over seeds); the interval over the test images says one image is no evidence.
    better = {s: np.where(np.arange(100) == 7, 0, w) for s, w in worse.items()}
    for w in worse.values():
        w[7] = 15
    rows, ranks = _study(better, worse)
    by = {(c["better"], c["metric"]): c for c in summarize(rows, ["2"], ranks)["comparisons"]}
    c = by[("both", "test/r_mean")]
    assert c["diffs"] == pytest.approx([1.0, 1.0, 1.0]) and verdict(c["diffs"]) == "reproduced"
    assert c["rule"] == "interval" and c["interval"]["lo"] <= 0 < c["interval"]["hi"] and c["verdict"] == "inconclusive"
    assert c["interval"]["n_seeds"] == 3 and c["interval"]["n_images"] == 100
    noise = by[("both", "dataset/noise_ratio")]  # not a ranked metric: the old rule, said so
    assert noise["interval"] is None and noise["rule"].startswith("2 SE rule")
    # a large effect on every seed: the interval lies above 0
    better = {s: np.where(np.arange(100) < 60, 0, w) for s, w in worse.items()}
    rows, ranks = _study(better, worse)
    c = summarize(rows, ["2"], ranks)["comparisons"][0]
    assert c["interval"]["lo"] > 0 and c["verdict"] == "reproduced"
    # ... and the other way round
    rows, ranks = _study(worse, better)
    assert summarize(rows, ["2"], ranks)["comparisons"][0]["verdict"] == "not reproduced"
    # one seed: the query interval only, flagged
    rows, ranks = _study({0: better[0]}, {0: worse[0]})
    c = summarize(rows, ["2"], ranks)["comparisons"][0]
    assert c["interval"]["one_seed"] and c["verdict"] == "reproduced (one seed: query interval only)"
    # a seed without ranks: no interval, the old rule
    rows, ranks = _study(better, worse)
    del ranks[("study-beam-s2", "capfilt")]
    c = summarize(rows, ["2"], ranks)["comparisons"][0]
    assert c["interval"] is None and c["rule"] == "2 SE rule: no per-query ranks" and c["verdict"] == "reproduced"


def test_an_about_equals_claim_is_reproduced_when_the_interval_contains_zero():
    rng = np.random.default_rng(1)
    rows, ranks = [], {}
    for seed in (0, 1, 2):
        for cell in ("sa", "no-sharing"):  # Table 3: baseline-only cells, the baseline side's ranks
            split = _ranks(rng.integers(0, 12, size=100))
            rows.append({"cell": cell, "seed": seed, "experiment": f"e-{cell}-{seed}",
                         "metrics": {"test/r_mean": r_mean(split)}})
            ranks[(f"e-{cell}-{seed}", "baseline")] = {"test": split}
    c = next(c for c in summarize(rows, ["3"], ranks)["comparisons"] if c["worse"] == "no-sharing")
    assert c["interval"]["lo"] < 0 < c["interval"]["hi"] and c["verdict"] == "reproduced"


def test_the_ceiling_table_reports_the_share_of_the_oracle_gain_capfilt_reaches():
    rows = []
    for seed, (base, both, oracle) in enumerate([(40.0, 42.0, 48.0), (41.0, 42.0, 45.0)]):
        rows += [{"cell": "baseline", "seed": seed, "metrics": {"test/r_mean": base, "zeroshot/r_mean": base}},
                 {"cell": "equal-steps", "seed": seed, "metrics": {"test/r_mean": both}},
                 {"cell": "oracle", "seed": seed, "metrics": {"test/r_mean": oracle, "zeroshot/r_mean": oracle + 1}},
                 {"cell": "clean", "seed": seed, "metrics": {"test/r_mean": oracle + 2}},
                 {"cell": "none-steps", "seed": seed, "metrics": {"test/r_mean": base + 0.5}}]
    s = summarize(rows, ["ceiling"])
    share = s["oracle_share"]
    assert [x["metric"] for x in share] == ["test/r_mean"]  # zero-shot: no "equal-steps" numbers
    assert share[0]["share"] == pytest.approx(1.5 / 6.0) and share[0]["seeds"] == [0, 1]
    by = {(c["better"], c["worse"], c["metric"]): c for c in s["comparisons"]}
    assert by[("oracle", "baseline", "test/r_mean")]["diffs"] == [8.0, 4.0]
    assert by[("clean", "baseline", "test/r_mean")]["diffs"] == [10.0, 6.0]
    assert by[("oracle", "equal-steps", "test/r_mean")]["diffs"] == [6.0, 3.0]
    assert by[("oracle", "none-steps", "test/r_mean")]["diffs"] == [7.5, 3.5]
    assert by[("equal-steps", "none-steps", "test/r_mean")]["diffs"] == [1.5, 0.5]  # CapFilt at the same steps
    assert by[("oracle", "none-steps", "zeroshot/r_mean")]["verdict"] == "not run"  # no zero-shot none-steps
    assert "oracle_share" not in summarize(rows, ["1"])


def test_measure_keeps_each_sides_ranks_beside_the_results(tmp_path):
    from blip.study import measure, ranks_path, read_ranks

    (tmp_path / "metrics" / "train").mkdir(parents=True)
    (tmp_path / "metrics" / "train" / "pretrain.json").write_text(json.dumps({"steps": 9}))
    (tmp_path / "metrics" / "evaluate_baseline.json").write_text(json.dumps({"test/r_mean": 40.0}))
    (tmp_path / "data" / "predictions").mkdir(parents=True)
    split = _ranks(np.arange(100) % 7)
    (tmp_path / "data" / "predictions" / "baseline_ranks.json").write_text(json.dumps({"test": split}))
    where = ranks_path(tmp_path / "study" / "results.jsonl")
    got = measure(tmp_path, sides=("baseline",), ranks_dir=where, experiment="study-sharing-all-s0-baseline")
    assert got == {"baseline": {"test/r_mean": 40.0, "pretrain/steps": 9}}  # results.jsonl rows stay as they were
    assert read_ranks(where) == {("study-sharing-all-s0-baseline", "baseline"): {"test": split}}
    assert where == tmp_path / "study" / "ranks" and read_ranks(tmp_path / "nowhere") == {}
    kept = where / "study-sharing-all-s0-baseline-baseline.json.gz"  # compact: one gzipped line, same bytes each time
    first = kept.read_bytes()
    measure(tmp_path, sides=("baseline",), ranks_dir=where, experiment="study-sharing-all-s0-baseline")
    assert kept.read_bytes() == first and len(first) < len(json.dumps({"test": split}, indent=2)) / 4
    (where / "study-old-s0-capfilt.json").write_text(json.dumps({"test": split}, indent=2))  # the old form still reads
    assert read_ranks(where)[("study-old-s0", "capfilt")] == {"test": split}


def test_report_only_writes_the_tables_from_the_rows_and_runs_nothing(tmp_path):
    from blip.study import main

    rows = [{"cell": c, "seed": seed, "seconds": 60.0, "metrics": {"test/r_mean": r + seed}}
            for seed in (0, 1) for c, r in (("both", 40.0), ("beam", 38.0))]
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--root", str(tmp_path), "--report-only", "--no-mlflow", "--tables", "2"]) == 0
    md = (tmp_path / "docs" / "study.md").read_text()
    assert "| both | 40.50 ± 0.71 |" in md and "| +2.00, +2.00 |" in md
    assert "| 2.00 ± 0.00 | – (2 SE rule: no per-query ranks) | reproduced |" in md  # old rows: the old rule, said so
    assert "95% interval" in md and "entirely on the paper's side of 0" in md  # the rule, stated
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
    assert sorted(r["cell"] for r in rows) == ["baseline", "beam", "both"]  # baseline: both's other side
    assert len({r["experiment"] for r in rows}) == 2
    beam = next(r for r in rows if r["cell"] == "beam")
    assert beam["sets"]["capfilt.decoding"] == "beam" and "dataset/noise_ratio" in beam["metrics"]
    assert 0 <= beam["metrics"]["synthetic/true_noise_ratio"] <= 1  # the caption checker's, beside it
    assert beam["metrics"]["repretrain/steps"] > 0 and beam["metrics"]["pretrain/steps"] == 6  # the smoke cap
    kept = {p.name for p in (repo / "study/ranks").iterdir()}  # each side's per-query ranks, for the intervals
    assert kept == {f"{r['experiment']}-{side}.json.gz" for r in rows for side in ("baseline", "capfilt")}
    exps = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert {r["experiment"] for r in rows} <= set(exps)
    md = (repo / "docs/study.md").read_text()
    assert "| both |" in md and "Table 2: nucleus beats beam downstream" in md and "inconclusive (one seed)" in md
    assert (repo / "docs/study-table-2.png").stat().st_size > 1000
    # resumable: a second call runs nothing new
    again = run([sys.executable, "-m", "blip.study", "--size", "smoke", "--tables", "2", "--seeds", "0",
                 "--root", str(repo), "--no-mlflow"], repo, timeout=600)
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]  # no dvc command
    assert len((repo / "study/results.jsonl").read_text().splitlines()) == len(rows) == 3
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
    assert set(rows) == {"both", "beam", "baseline", "sa", "all"}
    assert rows["sa"]["experiment"] == rows["both"]["experiment"] == rows["baseline"]["experiment"]  # reused
    assert rows["all"]["experiment"].endswith("-baseline") and "test/r_mean" in rows["all"]["metrics"]
    assert rows["all"]["sets"]["model.sharing"] == "all" and "capfilt" not in rows["all"]["both_sides"]
    assert "Running stage 'pretrain'" in t3.stdout and "Running stage 'repretrain'" not in t3.stdout
    assert "Table 3: all-except-SA beats sharing all" in (repo / "docs/study.md").read_text()
    bad = run([sys.executable, "-m", "blip.study", "--tables", "3", "--cells", "beam", "--root", str(repo)], repo,
              check=False)
    assert bad.returncode == 2 and "--cells beam: not a cell of tables 3" in bad.stderr
