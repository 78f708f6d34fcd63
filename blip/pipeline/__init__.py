"""Pipeline glue: params file, MLflow tracking (may import mlflow/dvc; blip's science modules never do)."""
