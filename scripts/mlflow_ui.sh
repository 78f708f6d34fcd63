#!/usr/bin/env bash
# Open the MLflow UI on this project's store (sqlite:///mlflow.db + mlartifacts/), one light worker.
# Usage: bash scripts/mlflow_ui.sh [PORT]   (default 5000) -> http://127.0.0.1:PORT
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec .venv/bin/mlflow server --host 127.0.0.1 --port "${1:-5000}" --workers 1 \
  --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}" --artifacts-destination "$PWD/mlartifacts"
