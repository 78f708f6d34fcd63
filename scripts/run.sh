#!/usr/bin/env bash
# Set up the environment and run the main job: the default bootstrap, `dvc repro` of dvc.yaml
# (generated data, tiny model, CPU; ~25 min on 2 cores with AVX512-BF16, longer without). Extra arguments go to `dvc repro`.
# Results: report.md, metrics/, plots/; MLflow store: mlflow.db (see README: "Look at the runs").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1
[ -d .dvc ] || dvc init -q
dvc repro "$@"
echo
echo "report: report.md   metrics: dvc metrics show   MLflow: bash scripts/mlflow_ui.sh"
