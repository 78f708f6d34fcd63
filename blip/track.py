"""Metric tracking interface for the engines.

Engines in ``blip/`` report through a :class:`Tracker` and never import MLflow; the pipeline
passes its MLflow implementation, tests pass :class:`MemoryTracker` or :class:`JsonlTracker`.
Only the main process logs (``dist.is_main_process``) — engines call the tracker on every rank
and the implementations drop non-main calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from . import dist


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, name: str | None = None) -> None: ...


class NullTracker:
    """Records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        pass


class MemoryTracker:
    """Keeps everything in lists (tests, the loop script)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        if dist.is_main_process():
            self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if dist.is_main_process():
            self.metrics.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        if dist.is_main_process():
            self.artifacts.append((str(path), name))

    def history(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


class JsonlTracker:
    """Appends one JSON line per call to ``path`` (readable by ``dvc plots`` and by people)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if dist.is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        if dist.is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        self._write({"artifact": str(path), "name": name})


class CsvTracker:
    """Per-step metrics with a given prefix as CSV (``dvc plots`` reads it): column ``step`` plus
    the metric names without the prefix; the columns are fixed by the first logged row."""

    def __init__(self, path: str | Path, prefix: str = "train/") -> None:
        self.path, self.prefix = Path(path), prefix
        self.columns: list[str] | None = None
        if dist.is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k[len(self.prefix):]: float(v) for k, v in metrics.items() if k.startswith(self.prefix)}
        if step is None or not row or not dist.is_main_process():
            return
        with self.path.open("a") as f:
            if self.columns is None:
                self.columns = sorted(row)
                f.write(",".join(["step", *self.columns]) + "\n")
            f.write(",".join([str(step), *(f"{row[c]:.6g}" if c in row else "" for c in self.columns)]) + "\n")

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        pass


class TeeTracker:
    """Sends every call to each of ``trackers``."""

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
