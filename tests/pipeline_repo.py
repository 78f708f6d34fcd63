"""A real project checkout for pipeline tests: a fresh git + DVC repo in a temp folder holding the
project's pipeline files (``dvc.yaml``, ``params.yaml`` with a variant applied, ``flows/``,
``prefect.yaml``). Stage commands run the installed ``blip`` package with this interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
FILES = ["dvc.yaml", "params.yaml", "params-smoke.yaml", "params-quick.yaml", "params-paper.yaml", "prefect.yaml", "flows",
         "byod/dvc.yaml", "byod/params.yaml", ".dvcignore",
         # the frozen stage's committed output (the shipped warm start), as a fresh clone has it
         "models/warmstart_vision", "metrics/train/warmstart_vision.json"]
GITIGNORE = (PROJECT / ".gitignore").read_text()


def repo_env(**extra: str) -> dict[str, str]:
    """Environment for DVC/Prefect/stage subprocesses: this venv first on PATH, nothing online."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "BLIP_MLFLOW", "PREFECT_API", "PYTEST_XDIST"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
    })
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, check=False, cwd=cwd, env=repo_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def make_repo(dest: Path, variant: str | None = "smoke") -> Path:
    """Copy the pipeline files into ``dest``, apply ``variant``, ``git init`` + ``dvc init``, commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".gitignore").write_text(GITIGNORE)
    run(["git", "init", "-q", "-b", "main"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    if variant:
        run([sys.executable, "-m", "blip", "params", "--variant", variant], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "pipeline test repo"], dest)
    return dest
