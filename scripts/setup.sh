#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent.
# torch 2.14.1 + torchvision 0.29.1 install from this machine kind's local wheel cache; on other
# machines pip fetches them from PyPI (see pyproject.toml for why these pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e '.[test]'
