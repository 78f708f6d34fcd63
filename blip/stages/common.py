"""Small helpers the stage functions share: JSON outputs, skip markers, dataset references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..track import DatasetRef


class StageError(ValueError):
    """A stage cannot run as called (a missing or skipped input, a wrong option); says what to do."""


SKIPPED = "SKIPPED.json"  # marker a stage writes into its output folder when a factor switches it off
DATASET_NAMES = {"dataset": "bootstrapped"}  # folder name -> dataset name, where they differ


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def skip(out: str | Path, reason: str, metrics: str | Path | None = None) -> dict:
    """Write an output folder that says why this stage had nothing to do (DVC still versions it),
    and the same to the stage's ``metrics`` file when it has one (DVC requires every output)."""
    shutil.rmtree(out, ignore_errors=True)
    Path(out).mkdir(parents=True)
    write_json(Path(out) / SKIPPED, {"skipped": reason})
    if metrics:
        write_json(metrics, {"skipped": reason})
    print(f"skipped: {reason}")
    return {"skipped": reason}


def unskip(out: str | Path) -> None:
    """Before a stage does real work into a persisted output folder (``persist: true`` in
    dvc.yaml, e.g. the captions), drop the marker an earlier skipped run left there: else the
    next stage reads the fresh results as "skipped" (a ``capfilt.parts=filter`` run, then
    ``captioner``, scored no synthetic captions)."""
    (Path(out) / SKIPPED).unlink(missing_ok=True)


def skipped(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / SKIPPED).is_file()


def datasets(paths: list[str] | tuple[str, ...] | str, context: str) -> list[DatasetRef]:
    """Dataset references for shard folders, named by folder (``data/generated/web`` -> web,
    ``data/capfilt/dataset`` -> bootstrapped)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    out = []
    for p in paths:
        name = Path(p).name or str(p)
        out.append(DatasetRef(DATASET_NAMES.get(name, name), str(p), context))
    return out
