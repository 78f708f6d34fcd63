"""Start-up cost of the pipeline's stage commands: wall seconds of each stage's own command.

Builds (or reuses) a smoke-size workspace (a git + DVC repo with the smoke variant, brought up to
date by ``dvc repro``), then re-runs each stage's command exactly as ``dvc.lock`` records it, N
times, and prints the median wall time per stage. For the light stages (data, tokenizer,
finetune_shared when skipped, filter_quality, report) nearly all of it is interpreter start-up
and imports; ``-X importtime`` shows which.

    python bench/bench_startup.py --workspace /tmp/startup-ws [--repeat 3] [--stages data report]

Set ``PYTHONPATH`` to another checkout to measure that version of ``blip`` with the same workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LIGHT = ["data", "tokenizer", "finetune_shared", "filter_quality", "report"]


def main(argv: list[str] | None = None) -> None:
    from pipeline_repo import make_repo, repo_env, run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages", nargs="+", default=LIGHT)
    ap.add_argument("--mlflow", choices=["on", "off"], default="on", help="stage tracking (default: on, as a user runs)")
    a = ap.parse_args(argv)
    ws = a.workspace.resolve()
    if not (ws / "dvc.yaml").is_file():
        make_repo(ws)
    extra = {"BLIP_MLFLOW": "0"} if a.mlflow == "off" else {}
    if os.environ.get("PYTHONPATH"):
        extra["PYTHONPATH"] = os.environ["PYTHONPATH"]
    run([sys.executable, "-m", "dvc", "repro"], ws, timeout=1800, **extra)
    import yaml

    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    env = repo_env(**extra)
    results = {}
    for stage in a.stages:
        cmd = shlex.split(lock[stage]["cmd"])
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode != 0:
                raise SystemExit(f"{stage} failed:\n{p.stderr[-3000:]}")
        results[stage] = round(statistics.median(times), 2)
        print(f"{stage:16s} {results[stage]:6.2f} s  (median of {a.repeat})", flush=True)
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "mlflow": a.mlflow, "seconds": results}))


if __name__ == "__main__":
    main()
