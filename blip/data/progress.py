"""The progress bar of every long loop in ``blip/``: a tqdm bar on a terminal, plain lines in a log.

Under a pipe (a DVC stage's output, CI, Prefect's logs) a tqdm bar redraws itself with ``\\r``, which
a log keeps as one endless line. So when stderr is not a terminal, or ``BLIP_PROGRESS=lines`` is
set, :func:`progress_bar` returns a :class:`LineBar` instead: one line on stderr (where tqdm
writes) every 5 % of the total or every 30 s, whichever comes first, and one at the end::

    generate: 150/600 img (25%), 41.3 img/s, elapsed 0:00:04, eta 0:00:11

Each line is shorter than :data:`MAX_LINE` characters. Switched off (``enabled=False``: tests,
library calls) it is an object with the same methods that does nothing, so call sites need no ifs.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

MAX_LINE = 300  # characters; a longer postfix is cut
EVERY_FRACTION = 0.05
EVERY_SECONDS = 30.0


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineBar:
    """tqdm's ``update``/``set_postfix``/``close`` as plain lines: one every ``every_fraction`` of
    ``total`` or every ``every_seconds``, whichever comes first, and one at the end (at 100 %, or at
    :meth:`close` when the loop stopped short). ``clock`` and ``stream`` are for tests (default:
    ``time.monotonic`` and ``sys.stderr`` as it is when a line is written)."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, *,
                 every_fraction: float = EVERY_FRACTION, every_seconds: float = EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._start = int(initial)
        self.postfix = ""
        self._step = max(1, math.ceil(self.total * every_fraction))
        self._every_seconds = every_seconds
        self._clock, self._stream = clock, stream
        self._t0 = self._last_t = clock()
        self._next = (self.n // self._step + 1) * self._step
        self._printed = self.n  # nothing to say until something happens
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            now = self._clock()
            if self.n >= self._next or (self.total and self.n >= self.total) or now - self._last_t >= self._every_seconds:
                self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        with self._lock:
            if self.n != self._printed:
                self._emit(self._clock())

    def line(self, now: float) -> str:
        """The line for the state at time ``now``."""
        elapsed = now - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else float("nan")
        head = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            head += f" ({100 * self.n / self.total:.0f}%)"
        eta = (self.total - self.n) / rate if rate > 0 and self.total else float("nan")
        rate_s = f"{rate:.3g} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s"
        text = f"{head}, {rate_s}, elapsed {_hms(elapsed)}, eta {_hms(eta) if self.n < self.total else '0:00:00'}"
        if self.postfix:
            text += f", {self.postfix}"
        return text if len(text) < MAX_LINE else text[: MAX_LINE - 4] + "..."

    def _emit(self, now: float) -> None:
        stream = self._stream or sys.stderr
        print(self.line(now), file=stream, flush=True)
        self._printed, self._last_t = self.n, now
        self._next = (self.n // self._step + 1) * self._step


def lines_wanted() -> bool:
    """Plain lines instead of a bar: ``BLIP_PROGRESS=lines``, or stderr is not a terminal."""
    if os.environ.get("BLIP_PROGRESS", "").strip().lower() == "lines":
        return True
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return True


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img", initial: int = 0):
    """A progress bar over ``total`` ``unit``s (``initial`` already done, e.g. a resumed run):
    tqdm on a terminal, a :class:`LineBar` in a log, a do-nothing object when not ``enabled``.
    All three take ``update(n)``, ``set_postfix(dict)`` and ``close()``."""
    if not enabled:
        return _NoBar()
    if lines_wanted():
        return LineBar(total, desc, unit, initial)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
