"""What a flow run does to its workspace, without a Prefect server: one run per checkout at a
time (a lock the kernel releases if the run dies), and its parameters gone when it ends."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.bootstrap import BACKUP_SUFFIX, run_params, workspace_lock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from flows.bootstrap import workspace_lock
with workspace_lock(Path(sys.argv[1]), "flow run holder-7"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_the_same_checkout_fails_naming_the_first_and_a_killed_one_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"in use by flow run holder-7 \(pid {holder.pid}\).*another checkout"):
            with workspace_lock(tmp_path, "flow run second"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workspace_lock(tmp_path, "flow run third"):  # SIGKILL left no stale lock behind
        assert "flow run third" in (tmp_path / ".blip-flow.lock").read_text()


def _params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "params-smoke.yaml").write_text((ROOT / "params-smoke.yaml").read_text())
    return p


def test_run_parameters_are_undone_when_the_run_ends_however_it_ends(tmp_path):
    p = _params(tmp_path)
    committed = p.read_bytes()
    with run_params(p, "smoke", {"capfilt.decoding": "nucleus"}):
        during = yaml.safe_load(p.read_text())
        assert during["capfilt"]["decoding"] == "nucleus"
        assert during["pretrain"]["epochs"] != yaml.safe_load(committed)["pretrain"]["epochs"]  # the smoke sizes
    assert p.read_bytes() == committed
    with pytest.raises(KeyboardInterrupt), run_params(p, None, {"capfilt.decoding": "nucleus"}):
        raise KeyboardInterrupt  # a cancelled run
    assert p.read_bytes() == committed and not p.with_name(p.name + BACKUP_SUFFIX).exists()


def test_parameters_left_by_a_killed_run_are_undone_by_the_next_run(tmp_path):
    p = _params(tmp_path)
    committed = p.read_bytes()
    p.with_name(p.name + BACKUP_SUFFIX).write_bytes(committed)  # what a SIGKILLed run leaves: its edit + the copy
    p.write_text(p.read_text().replace("decoding: beam", "decoding: nucleus"))
    with run_params(p, None, None):  # a plain run
        assert yaml.safe_load(p.read_text())["capfilt"]["decoding"] == "beam"
    assert p.read_bytes() == committed
