"""Screenshot the MLflow UI of a store: start a throw-away ``mlflow server``, open it in headless
Chromium, save a PNG, stop the server.

    python scripts/mlflow_screenshot.py --store sqlite:///$PWD/mlflow.db --out docs/mlflow.png
    python scripts/mlflow_screenshot.py --store sqlite:///$PWD/mlflow.db --out docs/compare.png \\
        --compare RUN_ID,RUN_ID

Without ``--url-path`` (or ``--compare``) it opens the runs table of the experiment named by
``--experiment`` (default ``blip-bootstrap``), or of the first experiment that is not ``Default``.

Chromium's command line cannot run a script in the page, so the UI is reached through a small
same-origin proxy that adds one to the HTML: it closes the MLflow Assistant side panel (which
would take a third of the picture) and expands the parent runs so their stage runs show.
``--raw`` points Chromium at the server directly instead.
Needs Chromium (Debian: ``apt-get install chromium``; Ubuntu: ``apt-get install chromium-browser``),
or set ``$CHROMIUM`` to a Chrome/Chromium binary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = (
    "headless Chromium is needed for the screenshot and none was found "
    f"(looked for $CHROMIUM, {', '.join(BROWSERS)}).\n"
    "Install it with:  apt-get install -y chromium        (Debian; sudo if not root)\n"
    "              or:  apt-get install -y chromium-browser (Ubuntu)\n"
    "or point $CHROMIUM at a Chrome/Chromium binary."
)


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def artifacts_dir(store: str) -> Path:
    """``mlartifacts`` beside a SQLite store's file (else in the current directory)."""
    if store.startswith("sqlite:///"):
        return Path(store[len("sqlite:///"):]).parent / "mlartifacts"
    return Path.cwd() / "mlartifacts"


def mlflow_command() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    if exe.is_file():
        return [str(exe)]
    return [shutil.which("mlflow") or "mlflow"]


def api(base: str, path: str, body: dict | None = None, method: str = "GET") -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server not healthy at {base}/health after {timeout:.0f} s")


def default_url_path(base: str, experiment: str) -> str:
    exps = api(base, "experiments/search", {"max_results": 1000}, "POST").get("experiments", [])
    named = [e for e in exps if e["name"] == experiment]
    others = sorted((e for e in exps if e["name"] != "Default"), key=lambda e: int(e.get("creation_time", 0)))
    pick = (named or others or exps or [{"experiment_id": "0"}])[0]
    return f"#/experiments/{pick['experiment_id']}/runs?workflowType=machine_learning"  # not the GenAI overview


def compare_url_path(base: str, run_ids: list[str]) -> str:
    exps = []
    for rid in run_ids:
        exp = api(base, f"runs/get?run_id={urllib.parse.quote(rid)}")["run"]["info"]["experiment_id"]
        if exp not in exps:
            exps.append(exp)
    q = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps(exps)})
    return f"#/compare-runs?{q}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# Runs in the page before the app: MLflow keeps these UI choices in localStorage (key + "_v1",
# JSON values). Then, for a few seconds, click every collapsed parent-run expander.
PAGE_SCRIPT = """<script>
(function () {
  var set = function (k, v) { try { localStorage.setItem(k + "_v1", JSON.stringify(v)); } catch (e) {} };
  set("mlflow.workflowType", "machine_learning");  // "Model training", not the GenAI pages
  set("mlflow.assistant.panelOpen", false);
  set("mlflow.assistant.fab.autoOpenedOnFirstLoad", true);
  set("mlflow.detectIssues.guidanceShown", true);
  set("mlflow.flagForReview.guidanceShown", true);
  var clicked = {}, t0 = Date.now();
  var timer = setInterval(function () {
    document.querySelectorAll('[data-component-id$="runnamecellrenderer.tsx_46"]').forEach(function (b) {
      var row = b.closest('[row-id]'), id = row ? row.getAttribute('row-id') : null;
      if (id && !clicked[id]) { clicked[id] = true; b.click(); }
    });
    if (Date.now() - t0 > 8000) clearInterval(timer);
  }, 500);
})();
</script>"""
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
        "host", "accept-encoding", "content-length"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(port: int, upstream: int) -> ThreadingHTTPServer:
    """Forward 127.0.0.1:``port`` to the MLflow server on ``upstream``, adding PAGE_SCRIPT to HTML pages."""

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if "text/html" in (r.getheader("Content-Type") or "") and b"<head>" in data:
                    data = data.replace(b"<head>", b"<head>" + PAGE_SCRIPT.encode(), 1)
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in _HOP | {"content-encoding", "content-security-policy"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}",
                    help="backend store URI (default: ./mlflow.db)")
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--port", type=int, default=5055)
    ap.add_argument("--url-path", help="UI route, e.g. '#/experiments/1' (default: the experiment's runs table)")
    ap.add_argument("--experiment", default="blip-bootstrap", help="experiment to open when no --url-path is given")
    ap.add_argument("--compare", help="RUN_ID,RUN_ID[,...]: open the compare-runs view of these runs")
    ap.add_argument("--window-size", default="1600,1000")
    ap.add_argument("--budget-ms", type=int, default=15000, help="Chromium --virtual-time-budget (the UI is a JS app)")
    ap.add_argument("--timeout", type=float, default=90, help="seconds to wait for the server's /health")
    ap.add_argument("--raw", action="store_true", help="no proxy: Chromium opens the server as it is")
    a = ap.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if a.store.startswith("sqlite:///") and not Path(a.store[len("sqlite:///"):]).is_file():
        print(f"error: no SQLite store at {a.store}", file=sys.stderr)
        return 2

    server_port = a.port if a.raw else free_port()
    base = f"http://127.0.0.1:{server_port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [*mlflow_command(), "server", "--host", "127.0.0.1", "--port", str(server_port),
           "--backend-store-uri", a.store, "--artifacts-destination", str(artifacts_dir(a.store)), "--workers", "1"]
    with tempfile.TemporaryDirectory(prefix="mlflow-shot-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(base, proc, a.timeout)
            if a.compare:
                path = compare_url_path(base, [r.strip() for r in a.compare.split(",") if r.strip()])
            else:
                path = a.url_path or default_url_path(base, a.experiment)
            proxy = None if a.raw else start_proxy(a.port, server_port)
            url = f"http://127.0.0.1:{a.port}/{path.lstrip('/')}"
            a.out.parent.mkdir(parents=True, exist_ok=True)
            out = a.out.resolve()
            out.unlink(missing_ok=True)
            shot = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", f"--user-data-dir={tmp}/profile", f"--window-size={a.window_size}",
                    f"--virtual-time-budget={a.budget_ms}", f"--screenshot={out}", url]
            try:
                r = subprocess.run(shot, check=False, capture_output=True, text=True,
                                   timeout=a.budget_ms / 1000 + 120)
            finally:
                if proxy is not None:
                    proxy.shutdown()
                    proxy.server_close()
            if not out.is_file():
                print(f"error: chromium wrote no screenshot (exit {r.returncode}):\n{r.stderr[-2000:]}",
                      file=sys.stderr)
                return 1
        except Exception as e:  # noqa: BLE001 - report with the server's log
            print(f"error: {e}\n--- mlflow server log (tail) ---\n{log_path.read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
            return 1
        finally:
            stop(proc)
    print(f"{out}  <- {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
