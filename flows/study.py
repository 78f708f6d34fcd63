"""Prefect flow ``study``: the paper's ablations over seeds (``python -m blip.study``) as one flow
run, its tables published as Prefect artifacts (``study-comparisons``, ``study-report``).

    python flows/study.py --size quick --tables 1 2 --seeds 0 1     # run it here
    prefect deployment run study/quick --watch                       # on a worker (prefect.yaml)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import inline_images, workspace  # noqa: E402


@flow(name="study", log_prints=True)
def study(size: str = "quick", tables: list[str] | None = None, seeds: list[int] | None = None,
          root: str | None = None) -> dict:
    """Run the study in the workspace (``$BLIP_ROOT`` or this repository); returns its summary."""
    ws = workspace(root)
    cmd = [sys.executable, "-m", "blip.study", "--size", size, "--root", str(ws),
           *(["--tables", *tables] if tables else []),  # none: blip.study's default, every table
           "--seeds", *map(str, seeds or [0, 1, 2])]
    print("+", " ".join(cmd))
    subprocess.run(cmd, cwd=ws, check=True)
    summary = json.loads((ws / "study" / "summary.json").read_text())
    create_table_artifact(key="study-comparisons", table=[
        {"table": c["table"], "claim": c["claim"], "metric": c["metric"],
         "mean_diff": round(sum(c["diffs"]) / len(c["diffs"]), 4) if c["diffs"] else None,
         "seeds": len(c["diffs"]), "verdict": c["verdict"]} for c in summary["comparisons"]],
        description="The paper's comparisons at the embedded scale: better − worse, paired by seed")
    md = ws / "docs" / "study.md"
    create_markdown_artifact(key="study-report", markdown=inline_images(md.read_text(), md.parent),
                             description="docs/study.md")
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="quick", choices=["full", "quick", "smoke"])
    ap.add_argument("--tables", nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    a = ap.parse_args()
    study(size=a.size, tables=a.tables, seeds=a.seeds)
