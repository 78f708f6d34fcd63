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


# The longest tests first (whole modules where they share a module fixture), in this order (seconds
# each in CI, 2 cores): xdist (`--dist load`) deals the first ones out alternately, so the loop with
# its kills runs on one worker while the study and the Prefect module run on the other, and the
# short tests fill in around them.
LONGEST = (
    "tests/test_pipeline_dvc.py::",  # the loop, its factors, then killed in each long stage: ~800 s
    "tests/test_study.py::test_smoke_study",  # ~350 s
    "tests/test_flow.py::",  # the full deployment ~250 s, then the others on the same Prefect server
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        for i, prefix in enumerate(LONGEST):
            if item.nodeid.startswith(prefix):
                return (0, i)
        return (1 if item.get_closest_marker("pipeline") else 2 if item.get_closest_marker("slow") else 3, 0)

    items.sort(key=rank)  # stable: the rest keep their file order
