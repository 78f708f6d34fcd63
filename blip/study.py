"""The paper's ablations (Tables 1-4, the Table 12 control, DataComp's ITC filter) and the ceilings
(the ``oracle`` and ``clean`` cells) at the embedded scale, over training seeds, by one command::

    python -m blip.study                       # full size (the committed params.yaml), seeds 0 1 2
    python -m blip.study --size quick          # a laptop: params-quick.yaml overlaid first
    python -m blip.study --tables 2 4 --seeds 0 1
    python -m blip.study --report-only         # the markdown and charts from study/results.jsonl

Every cell is one ``dvc exp run -S ... --name study-<cell>-s<seed>`` in this repository, so each is a
DVC experiment (``dvc exp show``) and an MLflow bootstrap run, and every stage a cell shares with an
earlier one (same params, same inputs) is restored from DVC's run cache instead of re-run: the
Table 1 settings share pre-training, fine-tuning, captioning and filtering, and differ from
``assemble`` on. Each cell starts from the committed ``params.yaml`` (``git checkout`` of the
file, then the size's overlay: commit your edits first) and sets *every* factor and seed, so
cells do not inherit each other's settings.

Results go to ``study/results.jsonl`` (one line per finished cell; a rerun skips them, so an
interrupted study resumes), each side's per-query retrieval ranks to ``study/ranks/<experiment>-
<side>.json.gz`` (the evaluate stage's ``data/predictions/<side>_ranks.json``, one gzipped line), then ``docs/study.md``
and ``docs/study-*.png``: mean ± std over seeds per cell, and each paper comparison with its
per-seed paired difference, the pooled difference's 95% interval (``blip.evaluate.intervals.pooled``:
a paired bootstrap over the test images, the same draw for every seed, plus the seed-to-seed
spread) and a verdict — **reproduced** (the interval entirely on the paper's side of 0), **not
reproduced** (entirely on the other side) or **inconclusive**; an "about equals" claim is
reproduced when the interval contains 0. Rows without ranks for every seed (results from before
the ranks were kept, and metrics other than retrieval) keep the older rule: the sign with |mean| >
2 standard errors. The markdown and charts are also logged to MLflow (run ``study``) and, when run
by the Prefect flow ``study``, published as artifacts.

The ceilings are evaluation instruments, not methods: ``oracle`` keeps the web texts the
generator's hidden noise labels call clean (``capfilt.filter_score: oracle``; synthetic texts as
the filter decides), ``clean`` is the same world generated without noise (its baseline is the
measure). They say how much cleaning *can* buy in this world; ``docs/study.md`` states the share
of the oracle's gain CapFilt reaches.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: what a cell sets when it does not vary it: the BLIP defaults of every factor
BASE = {"capfilt.parts": "both", "capfilt.decoding": "nucleus", "capfilt.models": "decoupled",
        "capfilt.filter_score": "itm", "model.sharing": "all_except_sa", "repretrain.max_steps": 0}
# warmstart_vision.seed is not among them: the shipped (frozen) warm start is one for every seed, as BLIP's DeiT
SEED_KEYS = ("warmstart_text.seed", "pretrain.seed", "finetune_captioner.seed", "finetune_filter.seed",
             "finetune_shared.seed", "repretrain.seed", "caption.seed")
SIZES = ("full", "quick", "smoke")
EPOCHS_UNBOUNDED = 1000  # Table 12's control: epochs as many as max_steps needs (the step schedule decays per epoch)


@dataclass(frozen=True)
class Cell:
    name: str
    tables: tuple[str, ...]
    sets: dict = field(default_factory=dict)
    measure: str = "capfilt"  # which model's downstream metrics the cell is about: capfilt | baseline


CELLS = (
    Cell("both", ("1", "2", "4", "12", "datacomp", "ceiling")),
    Cell("none", ("1", "ceiling"), {"capfilt.parts": "none"}),
    Cell("filter", ("1",), {"capfilt.parts": "filter"}),
    Cell("captioner", ("1",), {"capfilt.parts": "captioner"}),
    Cell("beam", ("2",), {"capfilt.decoding": "beam"}),
    Cell("sa", ("3",), {}, measure="baseline"),  # all except SA: BLIP's, the default
    Cell("all", ("3",), {"model.sharing": "all"}, measure="baseline"),
    Cell("ca", ("3",), {"model.sharing": "all_except_ca"}, measure="baseline"),
    Cell("no-sharing", ("3",), {"model.sharing": "none"}, measure="baseline"),
    Cell("shared", ("4",), {"capfilt.models": "shared"}),
    Cell("equal-steps", ("12", "ceiling"), {"repretrain.max_steps": "BASELINE_STEPS"}),
    Cell("itc", ("datacomp",), {"capfilt.filter_score": "itc"}),
    Cell("baseline", ("1", "2", "12", "ceiling"), {}, measure="baseline"),  # the noisy-data model (no CapFilt)
    # the ceilings (evaluation instruments): the hidden labels as the web filter; the world without noise.
    # Re-pre-trained for the baseline's steps, as "none-steps" and "equal-steps": the ceiling is about the
    # data, not about the fewer steps a smaller cleaned set gets (docs/recipe.md §0.4: 448 vs 580 steps
    # hid most of the oracle's gain)
    Cell("oracle", ("ceiling",), {"capfilt.filter_score": "oracle", "repretrain.max_steps": "BASELINE_STEPS"}),
    Cell("none-steps", ("ceiling",), {"capfilt.parts": "none", "repretrain.max_steps": "BASELINE_STEPS"}),
    Cell("clean", ("ceiling",), {"generate.noise_rate": 0}, measure="baseline"),  # reruns from the data stage on
)
TABLES = ("1", "2", "3", "4", "12", "datacomp", "ceiling")

#: the paper's comparisons: (table, better cell, worse cell, metric, what the paper found)
COMPARISONS = (
    ("1", "both", "baseline", "test/r_mean", "Table 1: CapFilt beats the noisy-data model (COCO TR@1 78.4 → 80.6)"),
    ("1", "both", "baseline", "zeroshot/r_mean", "Table 1: ... and zero-shot (Flickr TR@1 93.9 → 94.8)"),
    ("1", "filter", "baseline", "test/r_mean", "Table 1: the filter alone helps (COCO TR@1 78.4 → 79.1)"),
    ("1", "captioner", "baseline", "test/r_mean", "Table 1: the captioner alone helps (78.4 → 79.7)"),
    ("1", "both", "filter", "test/r_mean", "Table 1: both beat the filter alone (80.6 vs 79.1)"),
    ("1", "both", "captioner", "test/r_mean", "Table 1: both beat the captioner alone (80.6 vs 79.7)"),
    ("1", "both", "none", "test/r_mean", "Table 1 (re-pre-trained on the same noisy data): CapFilt helps"),
    ("1", "none", "baseline", "test/r_mean",
     "ours: re-pre-training on the same noisy data about equals the baseline (the run-to-run noise floor)"),
    ("2", "both", "beam", "test/r_mean", "Table 2: nucleus beats beam downstream (80.6 vs 79.6)"),
    ("2", "both", "beam", "dataset/noise_ratio", "Table 2: nucleus captions are noisier (25% vs 19%)"),
    # the default run decodes with beam search (chosen on val, docs/recipe.md §0.8): its CapFilt against
    # the baseline and against the filter alone, beside the paper's nucleus-sampled Table 1
    ("2", "beam", "baseline", "test/r_mean", "ours: CapFilt with beam captions (the default run's) beats the noisy-data model"),
    ("2", "beam", "baseline", "zeroshot/r_mean", "ours: ... and zero-shot"),
    ("2", "beam", "filter", "test/r_mean", "ours: with beam captions, both beat the filter alone (the captioner adds)"),
    ("3", "sa", "all", "test/r_mean", "Table 3: all-except-SA beats sharing all (78.4 vs 77.3)"),
    ("3", "sa", "ca", "test/r_mean", "Table 3: all-except-SA beats all-except-CA (78.4 vs 77.5)"),
    ("3", "sa", "no-sharing", "test/r_mean", "Table 3: all-except-SA about equals no sharing (78.4 vs 78.3)"),
    ("4", "both", "shared", "test/r_mean", "Table 4: decoupled beats shared (80.6 vs 79.8)"),
    ("4", "both", "shared", "dataset/noise_ratio", "Table 4: a shared filter drops fewer synthetic captions (25% vs 8%)"),
    ("12", "equal-steps", "baseline", "test/r_mean", "Table 12: CapFilt helps at the baseline's number of steps"),
    ("datacomp", "both", "itc", "test/r_mean", "DataComp baseline: ITM filter vs ITC cosine at equal kept count"),
    ("ceiling", "oracle", "baseline", "test/r_mean",
     "ours: a perfect web filter (the hidden labels) beats the noisy-data model — what cleaning can buy"),
    ("ceiling", "oracle", "baseline", "zeroshot/r_mean", "ours: ... and zero-shot"),
    ("ceiling", "oracle", "none-steps", "test/r_mean",
     "ours: the oracle beats re-pre-training on all web texts (both at the baseline's steps)"),
    ("ceiling", "oracle", "none-steps", "zeroshot/r_mean", "ours: ... and zero-shot"),
    ("ceiling", "equal-steps", "none-steps", "test/r_mean",
     "ours: CapFilt beats re-pre-training on all web texts (both at the baseline's steps: the data, not the steps)"),
    ("ceiling", "equal-steps", "none-steps", "zeroshot/r_mean", "ours: ... and zero-shot"),
    ("ceiling", "clean", "baseline", "test/r_mean", "ours: the same world without noise beats the noisy-data model"),
    ("ceiling", "clean", "baseline", "zeroshot/r_mean", "ours: ... and zero-shot"),
    ("ceiling", "oracle", "equal-steps", "test/r_mean",
     "ours: the oracle bounds CapFilt (a perfect filter beats BLIP's; both at the baseline's steps)"),
    ("ceiling", "oracle", "equal-steps", "zeroshot/r_mean", "ours: ... and zero-shot"),
    ("ceiling", "equal-steps", "baseline", "zeroshot/r_mean", "Table 12's control, zero-shot"),
)
#: the share of the oracle's gain CapFilt reaches, both at the baseline's steps:
#: (equal-steps − baseline) / (oracle − baseline)
ORACLE_SHARE = ("equal-steps", "oracle", "baseline")
#: ``dataset/noise_ratio`` is Table 2's: the share of synthetic captions the filter rejects;
#: ``synthetic/true_noise_ratio`` the share that is false of its image (the caption checker)
METRICS = ("test/r_mean", "zeroshot/r_mean", "test/CIDEr", "dataset/noise_ratio", "synthetic/true_noise_ratio",
           "filter/auc")


def cells_for(tables: list[str]) -> list[Cell]:
    return [c for c in CELLS if set(c.tables) & set(tables)]


def cell_sets(cell: Cell, seed: int, baseline_steps: int | None) -> dict[str, Any]:
    sets = {**BASE, **cell.sets, **{k: seed for k in SEED_KEYS}}
    if sets["repretrain.max_steps"] == "BASELINE_STEPS":
        if not baseline_steps:
            raise RuntimeError("the equal-steps cell needs the baseline's pre-training steps (run cell 'both' first)")
        sets["repretrain.max_steps"] = baseline_steps
        sets["repretrain.epochs"] = EPOCHS_UNBOUNDED  # the steps decide: a smaller bootstrapped set repeats
    return sets


def measure(root: Path, sides: tuple[str, ...] = ("baseline", "capfilt"), ranks_dir: Path | None = None,
            experiment: str | None = None) -> dict[str, dict[str, Any]]:
    """The numbers of the experiment just run in ``root`` (its metrics files), for ``sides``:
    ``baseline`` (pre-trained on the noisy data) and ``capfilt`` (on the bootstrapped data).
    ``ranks_dir``: also keep each side's per-query retrieval ranks (``data/predictions/<side>_ranks.json``,
    every retrieval split) as ``ranks_dir/<experiment>-<side>.json.gz`` (:func:`write_ranks`), for the intervals of
    :func:`summarize` (an experiment from before the evaluate stage wrote them has none: skipped)."""
    if ranks_dir is not None:
        for side in sides:
            src = root / "data" / "predictions" / f"{side}_ranks.json"
            if src.is_file():
                write_ranks(json.loads(src.read_text()), ranks_dir / f"{experiment}-{side}{RANKS_SUFFIX}")
    steps = json.loads((root / "metrics" / "train" / "pretrain.json").read_text())["steps"]
    out = {}
    for side in sides:
        m = json.loads((root / "metrics" / f"evaluate_{side}.json").read_text())
        out[side] = {k: m[k] for k in ("test/r_mean", "zeroshot/r_mean", "test/CIDEr", "test/txt_r1", "test/img_r1")
                     if isinstance(m.get(k), (int, float))} | {"pretrain/steps": steps}
    if "capfilt" in sides:
        out["capfilt"]["repretrain/steps"] = json.loads((root / "metrics/train/repretrain.json").read_text())["steps"]
        report = json.loads((root / "metrics" / "report.json").read_text())
        ds, fq = report.get("dataset") or {}, report.get("filter_quality") or {}
        for k in ("noise_ratio", "web_drop_ratio"):
            if ds.get(k) is not None:
                out["capfilt"][f"dataset/{k}"] = ds[k]
        if fq.get("auc") is not None:
            out["capfilt"]["filter/auc"] = fq["auc"]
        fq_file = root / "metrics" / "filter_quality.json"
        check = json.loads(fq_file.read_text()).get("synthetic_check") or {} if fq_file.is_file() else {}
        for k in ("true_noise_ratio", "objects_right", "kept_noise_ratio", "auc_itm"):
            if isinstance(check.get(k), (int, float)):
                out["capfilt"][f"synthetic/{k}"] = check[k]
    return out


def _dvc(root: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "dvc", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, check=True)


def reset_params(root: Path, size: str) -> None:
    """Put the workspace's params.yaml back to the committed file (+ the size's overlay). ``dvc exp
    run -S`` edits the workspace file and leaves it so: without this a key one cell sets (Table
    12's unbounded epochs) would leak into the next cell."""
    subprocess.run(["git", "checkout", "HEAD", "--", "params.yaml"], cwd=root, check=True)  # DVC stages its edits
    if size != "full":
        from .params import apply_variant

        apply_variant(root / "params.yaml", size)


def run_cells(root: Path, cells: list[Cell], seeds: list[int], results: Path, size: str = "full") -> list[dict]:
    """Run every (cell, seed) not yet in ``results``; returns all result rows. Cells with the same
    settings (the default run is the ``both`` cell, its baseline column the ``baseline`` and ``sa``
    cells) share one experiment. A cell about the baseline alone (Table 3's sharing strategies)
    runs only the stages up to ``evaluate@baseline``, as experiment ``<name>-baseline``."""
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    ranks_dir = ranks_path(results)
    have = {(r["cell"], r["seed"]) for r in done}
    runs = {(r["seed"], r["experiment"]): r["both_sides"] for r in done}
    order = sorted(cells, key=lambda c: c.name != "both")  # "both" first: its pre-training steps feed equal-steps
    for seed in seeds:
        for cell in order:
            if (cell.name, seed) in have:
                continue
            steps = next((r["metrics"]["pretrain/steps"] for r in done if r["seed"] == seed and r["cell"] == "both"),
                         None)
            sets = cell_sets(cell, seed, steps)
            diffs = [f"{k.split('.')[-1]}-{v}" for k, v in sets.items()
                     if k not in SEED_KEYS and k != "repretrain.epochs" and BASE.get(k) != v]
            name = f"study-{'-'.join(diffs) or 'default'}-s{seed}"  # one DVC experiment per distinct setting
            t0 = time.time()
            args = [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]
            full, part = name, f"{name}-baseline"
            if (seed, full) in runs:
                exp = full
            elif cell.measure == "baseline":  # only the noisy-data model's stages: what evaluate@baseline needs
                exp = part
                if (seed, part) not in runs:
                    reset_params(root, size)
                    _dvc(root, ["exp", "run", "--name", part, *args, "evaluate@baseline"])
                    runs[(seed, part)] = measure(root, sides=("baseline",), ranks_dir=ranks_dir, experiment=part)
            else:
                exp = full
                reset_params(root, size)
                _dvc(root, ["exp", "run", "--name", full, *args])
                runs[(seed, full)] = measure(root, ranks_dir=ranks_dir, experiment=full)
            row = {"cell": cell.name, "seed": seed, "experiment": exp, "sets": sets,
                   "seconds": round(time.time() - t0, 1), "metrics": runs[(seed, exp)][cell.measure],
                   "both_sides": runs[(seed, exp)]}
            done.append(row)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return done


def ranks_path(results: Path) -> Path:
    """Where the per-query ranks of the experiments in ``results`` are kept: ``<its folder>/ranks``."""
    return results.parent / "ranks"


#: how :func:`measure` keeps an experiment side's per-query ranks: one line of JSON, gzipped
#: (~16 KB instead of the evaluate stage's indented ~250 KB, one number a line), so that a study's
#: dozens of experiments stay small in git; files of the old form (``.json``) are still read
RANKS_SUFFIX = ".json.gz"


def write_ranks(ranks: Mapping, path: Path) -> None:
    """``ranks`` (``{split: {txt_ranks, img_ranks, ...}}``) to ``path`` as one gzipped JSON line; the
    gzip header carries no time, so the same ranks give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(ranks, separators=(",", ":"), sort_keys=True).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
        fh.write(data)


def read_ranks(ranks_dir: Path) -> dict[tuple[str, str], dict]:
    """``(experiment, side) -> {split: ranks}`` from the ``<experiment>-<side>.json.gz`` (or older
    ``.json``) files that :func:`measure` kept (none: an empty dict)."""
    out = {}
    for path in sorted(ranks_dir.iterdir()) if ranks_dir.is_dir() else []:
        for suffix, load in ((RANKS_SUFFIX, lambda p: json.loads(gzip.decompress(p.read_bytes()))),
                             (".json", lambda p: json.loads(p.read_text()))):
            if path.name.endswith(suffix):
                experiment, _, side = path.name[: -len(suffix)].rpartition("-")
                if experiment and side in ("baseline", "capfilt"):
                    out[(experiment, side)] = load(path)
                break
    return out


def _by(rows: list[dict], cell: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][metric] for r in rows if r["cell"] == cell and metric in r["metrics"]}


def verdict(diffs: list[float]) -> str:
    """Paired per-seed differences (better − worse as the paper has it) → a verdict (the rule for
    rows without per-query ranks: the sign, with |mean| > 2 standard errors)."""
    if len(diffs) < 2:
        return "inconclusive (one seed)"
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    if abs(mean) > 2 * se and mean != 0:
        return "reproduced" if mean > 0 else "not reproduced"
    return "inconclusive"


def interval_verdict(interval: Mapping, about_equal: bool = False) -> str:
    """The verdict from the pooled interval of better − worse (``intervals.pooled``): reproduced
    when it lies entirely above 0 (the paper's side), not reproduced when entirely below, else
    inconclusive; an "about equals" claim is reproduced when the interval contains 0. One seed:
    the interval carries the query sampling only, and the verdict says so."""
    from .evaluate.intervals import side_of_zero

    side = side_of_zero(interval)
    if about_equal:
        v = "reproduced" if side == 0 else "not reproduced"
    else:
        v = {1: "reproduced", -1: "not reproduced", 0: "inconclusive"}[side]
    return v + (" (one seed: query interval only)" if interval["one_seed"] else "")


def _side_ranks(rows: list[dict], cell: str, seed: int, split: str, ranks: Mapping) -> dict | None:
    """One split's ranks of ``cell`` at ``seed`` (its experiment, the side the cell measures), or None."""
    row = next((r for r in rows if r["cell"] == cell and r["seed"] == seed), None)
    side = next(c.measure for c in CELLS if c.name == cell)
    per_split = ranks.get((row.get("experiment"), side)) if row else None
    return (per_split or {}).get(split)


def _pooled(rows: list[dict], better: str, worse: str, metric: str, seeds: list[int], ranks: Mapping) -> dict | None:
    """``intervals.pooled`` of better − worse over ``seeds`` when every seed has both cells' ranks
    for the metric's split (retrieval ``<split>/r_mean`` only), else None."""
    from .evaluate.intervals import pooled

    split, _, name = metric.partition("/")
    if name != "r_mean" or not seeds:
        return None
    pairs = [(_side_ranks(rows, better, s, split, ranks), _side_ranks(rows, worse, s, split, ranks)) for s in seeds]
    if any(a is None or b is None for a, b in pairs):
        return None
    try:
        return pooled(pairs)
    except ValueError as e:  # e.g. a cell evaluated on another test set: no paired interval
        print(f"study: no interval for {better} vs {worse} ({metric}): {e}", file=sys.stderr)
        return None


def oracle_share(rows: list[dict], metric: str) -> dict | None:
    """The share of the oracle's gain CapFilt reaches on ``metric``: mean over seeds of (both −
    baseline) over the mean over seeds of (oracle − baseline) — a ratio of seed means, which stays
    finite where one seed's oracle gain is near 0. None without all three cells on a common seed."""
    both, oracle, base = (_by(rows, c, metric) for c in ORACLE_SHARE)
    seeds = sorted(set(both) & set(oracle) & set(base))
    if not seeds:
        return None
    gain = statistics.mean(oracle[s] - base[s] for s in seeds)
    reached = statistics.mean(both[s] - base[s] for s in seeds)
    return {"metric": metric, "seeds": seeds, "capfilt_gain": reached, "oracle_gain": gain,
            "share": reached / gain if gain else None}


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.mean(values)
    return f"{m:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def summarize(rows: list[dict], tables: list[str],
              ranks: Mapping[tuple[str, str], dict] | None = None) -> dict[str, Any]:
    """Per cell the metrics over seeds; per comparison of ``tables`` the per-seed differences, the
    pooled interval (``interval``, where ``ranks`` — :func:`read_ranks` — hold both cells' ranks
    for every seed; else None) and the verdict by the rule that applies (``rule``: "interval", or
    the 2-SE rule and why; see the module docstring); with the ceiling table, ``oracle_share``."""
    ranks = ranks or {}
    cells = [c for c in CELLS if any(r["cell"] == c.name for r in rows)]
    table = {c.name: {m: sorted(_by(rows, c.name, m).values()) for m in METRICS} for c in cells}
    comps = []
    for tab, better, worse, metric, claim in COMPARISONS:
        if tab not in tables:
            continue
        a, b = _by(rows, better, metric), _by(rows, worse, metric)
        seeds = sorted(set(a) & set(b))
        diffs = [a[s] - b[s] for s in seeds]
        interval = _pooled(rows, better, worse, metric, seeds, ranks)
        about_equal = "about equals" in claim
        if tab == "datacomp":
            v = "compare"  # no paper claim: the two filters side by side
        elif interval is not None:
            v = interval_verdict(interval, about_equal)
        elif about_equal:  # reproduced when the difference is within noise
            v = verdict(diffs) if len(diffs) < 2 else (
                "reproduced" if verdict(diffs) == "inconclusive" else "not reproduced")
        else:
            v = verdict(diffs)
        rule = "interval" if interval is not None else "no paper claim" if tab == "datacomp" else \
            "2 SE rule: no per-query ranks" if metric.endswith("/r_mean") else "2 SE rule: not a ranked metric"
        comps.append({"table": tab, "better": better, "worse": worse, "metric": metric, "claim": claim,
                      "seeds": seeds, "diffs": diffs, "interval": interval, "rule": rule,
                      "verdict": v if seeds else "not run"})
    out = {"cells": table, "comparisons": comps}
    if "ceiling" in tables:
        out["oracle_share"] = [s for m in ("test/r_mean", "zeroshot/r_mean") if (s := oracle_share(rows, m))]
    return out


def _interval_cell(c: dict) -> str:
    """``+1.23 [+0.40, +2.06]`` (the pooled interval; ±h: its half-width, the smallest effect it can
    detect), or what rule the row uses instead."""
    iv = c.get("interval")
    if not iv:
        return f"– ({c.get('rule', '2 SE rule')})" if c.get("seeds") else "–"
    flag = ", queries only" if iv["one_seed"] else ""
    return (f"{iv['mean']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}] (±{iv['half_width']:.2f}, "
            f"{iv['n_images']} images{flag})")


def write_markdown(summary: dict, rows: list[dict], out: Path, size: str, charts: list[str]) -> None:
    seeds = sorted({r["seed"] for r in rows})
    wall = sum(r["seconds"] for r in rows)
    lines = [f"# The study: BLIP's ablations at the embedded scale ({size} size)\n",
             f"Seeds {', '.join(map(str, seeds))}; {len(rows)} experiments, {wall / 3600:.1f} h of `dvc exp run` "
             f"wall time (stages restored from the run cache count as seconds). Produced by `python -m blip.study"
             f"{'' if size == 'full' else ' --size ' + size}`; raw rows: `study/results.jsonl`.\n",
             "## Cells (mean ± std over seeds)\n",
             "| cell | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for cell, metrics in summary["cells"].items():
        lines.append(f"| {cell} | " + " | ".join(_ms(metrics[m]) for m in METRICS) + " |")
    lines += ["", "## The paper's comparisons\n",
              "Each row pairs the two cells seed by seed (same seed, same data). The interval (95%) is that of the "
              "mean over seeds of the per-seed differences: a paired bootstrap over the test images (both cells "
              "and every seed on the same 2000 resamples of the images, each image with its texts) for the "
              "query sampling, and t·s/√n of the per-seed differences for the seed-to-seed spread, added in "
              "quadrature (one seed: the query interval alone, so said in the verdict). Verdict: *reproduced* "
              "when the interval lies entirely on the paper's side of 0 (better − worse > 0), *not reproduced* "
              "when entirely on the other side, else *inconclusive*; an \"about equals\" claim is reproduced when "
              "the interval contains 0. Rows without per-query ranks for every seed (\"2 SE\": results from "
              "before the evaluate stage kept them, and metrics other than retrieval r_mean) keep the older "
              "rule: the sign, when the mean difference is more than two standard errors from 0 (an \"about "
              "equals\" claim: reproduced when it is not).\n",
              "| table | claim | ours: better − worse per seed | mean ± std | 95% interval | verdict |",
              "|---|---|---|---:|---:|---|"]
    for c in summary["comparisons"]:
        per_seed = ", ".join(f"{d:+.2f}" for d in c["diffs"]) or "–"
        lines.append(f"| {c['table']} | {c['claim']} ({c['better']} vs {c['worse']}, {c['metric']}) | {per_seed} | "
                     f"{_ms(c['diffs'])} | {_interval_cell(c)} | {c['verdict']} |")
    for share in summary.get("oracle_share") or []:
        pct = "–" if share["share"] is None else f"{100 * share['share']:.0f}%"
        lines.append(f"\nCapFilt reaches **{pct}** of the oracle's gain on {share['metric']} (seeds "
                     f"{', '.join(map(str, share['seeds']))}): ({ORACLE_SHARE[0]} − {ORACLE_SHARE[2]}) / "
                     f"({ORACLE_SHARE[1]} − {ORACLE_SHARE[2]}), both re-pre-trained for the baseline's steps, each the "
                     f"mean over seeds: {share['capfilt_gain']:+.2f} / {share['oracle_gain']:+.2f}.")
    lines += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in charts], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def draw_charts(summary: dict, out_dir: Path, tables: list[str]) -> list[str]:
    """One PNG per table that has results of its own cells (a cell's first table is its own; the
    baseline alone is no Table 12 chart): bars = mean over seeds, error bars = std, per metric panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for tab in tables:
        names = [c.name for c in CELLS if tab in c.tables and c.name in summary["cells"]]
        if not any(c.tables[0] == tab for c in CELLS if c.name in names):
            continue
        metrics = [m for m in ("test/r_mean", "zeroshot/r_mean", "dataset/noise_ratio",
                               "synthetic/true_noise_ratio") if any(summary["cells"][n][m] for n in names)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            vals = [summary["cells"][n][m] for n in names]
            means = [statistics.mean(v) if v else 0.0 for v in vals]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
            ax.set_title(m, fontsize=10)
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.suptitle(f"Table {tab}" if tab[0].isdigit() else tab, fontsize=11)
        fig.tight_layout()
        path = out_dir / f"study-table-{tab}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def log_mlflow(root: Path, summary: dict, files: list[str]) -> None:
    from .pipeline import tracking

    tracking.log_study(root, summary, files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="full",
                    help="full: params.yaml as it is; quick: overlay params-quick.yaml; smoke: params-smoke.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES),
                    help="ceiling: the oracle and clean cells (evaluation instruments) and their comparisons")
    ap.add_argument("--cells", nargs="+", metavar="CELL",
                    help="run only these cells of the chosen tables (e.g. --tables 3 --cells all); "
                         "the report still covers every row already in --results")
    ap.add_argument("--root", default=".", help="the project checkout (a git + DVC repository)")
    ap.add_argument("--out", default="docs/study.md")
    ap.add_argument("--results", default="study/results.jsonl")
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write docs/study.md and the charts from the rows already in --results")
    a = ap.parse_args(argv)
    root = Path(a.root).resolve()
    cells = cells_for(a.tables)
    if a.cells:
        unknown = sorted(set(a.cells) - {c.name for c in cells})
        if unknown:
            ap.error(f"--cells {' '.join(unknown)}: not a cell of tables {' '.join(a.tables)} "
                     f"(their cells: {', '.join(c.name for c in cells)})")
        cells = [c for c in cells if c.name in a.cells]
    if a.report_only:
        path = root / a.results
        if not path.is_file():
            ap.error(f"--report-only: no results in {path}")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = run_cells(root, cells, a.seeds, root / a.results, a.size)
    rows = [r for r in rows if r["seed"] in a.seeds]
    summary = summarize(rows, a.tables, read_ranks(ranks_path(root / a.results)))
    out = root / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(summary, out.parent, a.tables)
    write_markdown(summary, rows, out, a.size, charts)
    (root / a.results).with_name("summary.json").write_text(json.dumps(summary, indent=1))
    if not a.no_mlflow:
        log_mlflow(root, summary, [str(out), *charts])
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
