"""The tracker protocol: what stages and engines record, and where.

Engines in ``blip/`` report through a :class:`Tracker` and never import MLflow; the pipeline passes
its MLflow implementation (``blip.pipeline.tracking.StageTracker``), tests pass
:class:`MemoryTracker` or :class:`JsonlTracker`. Only the main process records
(:func:`is_main_process`, the one rank check): engines call the tracker on every rank and the
implementations drop non-main calls. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


def is_main_process() -> bool:
    """Rank 0 of the process group when one exists, else by torchrun's ``RANK`` (0 when unset).
    Reads ``torch.distributed`` only if something already imported it, so it costs no import."""
    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def flatten(d: dict, sep: str = ".", prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested dicts to joined keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``sep="/"``: metric names).
    An empty dict is a leaf; top-level keys in ``skip`` are left out."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not prefix and k in skip:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, sep, f"{name}{sep}"))
        else:
            out[name] = v
    return out


def numeric(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict as metrics: keys joined with '/' after ``prefix``."""
    return {k: float(v) for k, v in flatten(d, "/", prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a stage read or wrote: ``name`` (web, human, bootstrapped, ...), its folder, a
    digest (``dvc.lock``'s md5 where DVC versions it) and the role it played (``context``:
    training, evaluation, input, output)."""

    name: str
    path: str
    context: str = "training"
    digest: str | None = None


@runtime_checkable
class Tracker(Protocol):
    """What a stage records. Engines use the first three; stage functions the rest."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, name: str | None = None) -> None: ...

    def log_model(self, path: str | Path, name: str, *, role: str | None = None, hf: bool = False,
                  register: str | None = None) -> None: ...

    def log_datasets(self, datasets: list[DatasetRef]) -> None: ...

    def log_parent_metrics(self, metrics: dict[str, float]) -> None: ...

    def set_parent_tags(self, tags: dict[str, Any]) -> None: ...

    def stage_durations(self) -> dict[str, float]: ...


class NullTracker:
    """Records nothing (tracking off, non-main ranks); the base of the in-process trackers."""

    enabled = False

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        pass

    def log_model(self, path: str | Path, name: str, *, role: str | None = None, hf: bool = False,
                  register: str | None = None) -> None:
        pass

    def log_datasets(self, datasets: list[DatasetRef]) -> None:
        pass

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def set_parent_tags(self, tags: dict[str, Any]) -> None:
        pass

    def stage_durations(self) -> dict[str, float]:
        return {}


class MemoryTracker(NullTracker):
    """Keeps everything in lists (tests, the loop script)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        if is_main_process():
            self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if is_main_process():
            self.metrics.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        if is_main_process():
            self.artifacts.append((str(path), name))

    def history(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


class JsonlTracker(NullTracker):
    """Appends one JSON line per call to ``path`` (readable by ``dvc plots`` and by people)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        if is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        self._write({"artifact": str(path), "name": name})


class CsvTracker(NullTracker):
    """Per-step metrics with a given prefix as CSV (``dvc plots`` reads it): column ``step`` plus
    the metric names without the prefix; the columns are fixed by the first logged row."""

    def __init__(self, path: str | Path, prefix: str = "train/") -> None:
        self.path, self.prefix = Path(path), prefix
        self.columns: list[str] | None = None
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k[len(self.prefix):]: float(v) for k, v in metrics.items() if k.startswith(self.prefix)}
        if step is None or not row or not is_main_process():
            return
        with self.path.open("a") as f:
            if self.columns is None:
                self.columns = sorted(row)
                f.write(",".join(["step", *self.columns]) + "\n")
            f.write(",".join([str(step), *(f"{row[c]:.6g}" if c in row else "" for c in self.columns)]) + "\n")


class TeeTracker(NullTracker):
    """Sends the engines' calls (params, metrics, artifacts) to each of ``trackers``."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, name)
