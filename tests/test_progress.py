"""Logs a person can read: under a pipe the progress of a long loop is plain lines (every 5 % or
30 s, the last at 100 %), never a tqdm bar redrawn with ``\\r`` into one endless log line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from blip.data.progress import MAX_LINE, LineBar, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def log_lines(text: str) -> list[str]:
    """What a log viewer shows as lines: split on ``\\n`` and on ``\\r`` alike."""
    return re.split(r"[\r\n]", text)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_line_bar_every_five_percent_or_thirty_seconds_and_the_last_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    bar = LineBar(200, "caption", unit="img", clock=clock, stream=out)
    for _ in range(9):  # 9 img in 9 s: under 5 % (10 img) and under 30 s, nothing yet
        clock.t += 1
        bar.update(1)
    assert out.getvalue() == ""
    clock.t += 1
    bar.update(1)  # 10/200 = 5 %
    assert out.getvalue().splitlines() == ["caption: 10/200 img (5%), 1 img/s, elapsed 0:00:10, eta 0:03:10"]
    clock.t += 31  # slow: 30 s pass before the next 5 %
    bar.update(2)
    assert out.getvalue().splitlines()[-1] == "caption: 12/200 img (6%), 0.293 img/s, elapsed 0:00:41, eta 0:10:42"
    bar.set_postfix({"loss": "1.234"})
    clock.t += 1
    bar.update(188)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("caption: 200/200 img (100%), ") and last.endswith("eta 0:00:00, loss=1.234")
    n = len(out.getvalue().splitlines())
    bar.close()  # already said at 100 %
    assert len(out.getvalue().splitlines()) == n == 3


def test_line_bar_says_where_a_loop_stopped_short_and_cuts_long_lines():
    clock, out = FakeClock(), io.StringIO()
    bar = LineBar(1000, "import", unit="img", clock=clock, stream=out, initial=500)  # a resumed run: rate from here
    clock.t += 10
    bar.update(60)  # 560: past the 5 % mark of 550
    bar.set_postfix(note="x" * 1000)
    bar.update(1)
    bar.close()  # interrupted at 561: said at close
    lines = out.getvalue().splitlines()
    assert lines[0] == "import: 560/1000 img (56%), 6 img/s, elapsed 0:00:10, eta 0:01:13"
    assert len(lines) == 2 and lines[1].startswith("import: 561/1000 img (56%)") and len(lines[1]) < MAX_LINE
    assert lines[1].endswith("...")


def test_progress_bar_picks_lines_off_a_terminal(monkeypatch):
    monkeypatch.setenv("BLIP_PROGRESS", "lines")
    assert isinstance(progress_bar(10, True, "x"), LineBar)
    monkeypatch.delenv("BLIP_PROGRESS")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a tty
    assert isinstance(progress_bar(10, True, "x"), LineBar)
    off = progress_bar(10, False, "x")
    off.update(3), off.set_postfix({"a": 1}), off.close()
    assert sys.stderr.getvalue() == ""


def test_a_real_command_under_a_pipe_logs_short_progress_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BLIP_PROGRESS"}
    p = subprocess.run(
        [sys.executable, "-m", "blip.data", "generate", "--out", str(tmp_path / "gen"), "--web", "40", "--human", "8",
         "--val", "4", "--test", "4", "--zeroshot", "4", "--shard-size", "4", "--image-size", "32", "--processes", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = log_lines(p.stdout) + log_lines(p.stderr)
    too_long = [line for line in lines if len(line) >= MAX_LINE]
    assert too_long == [], f"{len(too_long)} log lines of {MAX_LINE}+ characters, e.g. {too_long[0][:200]!r}..."
    progress = [line for line in log_lines(p.stderr) if re.match(r"generate: \d+/60 img \(\d+%\)", line)]
    assert len(progress) >= 10 and progress[-1].startswith("generate: 60/60 img (100%)"), p.stderr[-3000:]
    assert "\r" not in p.stderr
