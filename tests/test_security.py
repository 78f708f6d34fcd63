"""Security basics, checked on the source: nothing unpickles (checkpoints are tensors only) and
the servers our scripts start listen on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("blip", "flows", "bench", "scripts") for p in (ROOT / d).rglob("*.py"))
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            if owner == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where} torch.load without weights_only=True")
            elif owner in UNPICKLERS:
                found.append(f"{where} {owner}.load")
    return found


def test_nothing_unpickles():
    assert len(CODE) > 50  # the scan saw the code
    bad = [v for p in CODE for v in _violations(p)]
    assert bad == [], "unpickling can run code from a file: use safetensors / torch.load(weights_only=True)\n" + "\n".join(bad)


def test_the_scan_catches_what_it_forbids(tmp_path):
    p = ROOT / "tests" / "_scan_probe.py"
    try:
        p.write_text("import pickle\nimport torch\nx = torch.load('a.pth')\ny = torch.load('b', weights_only=False)\n"
                     "z = torch.load('c', weights_only=True)\n")
        assert [v.split(" ", 1)[1] for v in _violations(p)] == [
            "imports pickle", "torch.load without weights_only=True", "torch.load without weights_only=True"]
    finally:
        p.unlink()


def test_servers_we_start_listen_on_localhost():
    for path in [*ROOT.glob("scripts/*"), *CODE]:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "0.0.0.0" not in text, f"{path}: binds every interface"
        for m in re.finditer(r"(mlflow\S*\s+(server|ui)|prefect\s+server\s+start)[^\n]*", text):
            assert "--host 127.0.0.1" in m.group(0) or "--host" not in m.group(0), (path, m.group(0))
    ui = (ROOT / "scripts" / "mlflow_ui.sh").read_text()
    assert '--host 127.0.0.1' in ui
