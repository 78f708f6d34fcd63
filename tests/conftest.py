"""Test-wide settings: offline hub, one torch thread per xdist worker, deterministic seeds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub (environment.md §3)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# stage commands run from tests must not log into the repository's MLflow store; the pipeline
# tests (pipeline_repo.repo_env) and the tracking tests turn it back on in their own stores
os.environ.setdefault("BLIP_MLFLOW", "0")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores
