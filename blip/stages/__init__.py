"""The pipeline's stages as library functions: ``registry.STAGES`` names each one with its params,
its training job, what it records and its command-line paths; ``data``, ``train``, ``capfilt``
and ``evaluate`` hold the functions. A ``dvc.yaml`` command (``python -m blip <stage>``), a
Prefect task and a test all call the same function."""
