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


# The longest tests first, spread over the two xdist workers. `scripts/test.sh` runs
# `-n 2 --dist load --maxschedchunk 1`: xdist hands each worker two consecutive tests to start with,
# then one at a time to whichever worker has drained its queue. So the loop with its kills (~650 s
# in CI) goes first to worker 0 with one short test queued behind it, the smoke study (~350 s) and
# the Prefect module (~450 s, one server per module) go to worker 1, and the short tests fill in.
LONGEST = (
    "tests/test_pipeline_dvc.py::",  # the loop, its factors, then killed in each long stage
    "tests/test_study.py::test_smoke_study",
    "tests/test_flow.py::",  # the full deployment, then the others on the same Prefect server
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        for i, prefix in enumerate(LONGEST):
            if item.nodeid.startswith(prefix):
                return (0, i)
        return (1 if item.get_closest_marker("pipeline") else 2 if item.get_closest_marker("slow") else 3, 0)

    items.sort(key=rank)  # stable: the rest keep their file order
    first = next((i for i, item in enumerate(items) if rank(item)[0] == 3), None)
    if first is not None and len(items) > 2 and rank(items[1])[0] == 0:
        items.insert(1, items.pop(first))  # one short test queued behind the loop on worker 0
