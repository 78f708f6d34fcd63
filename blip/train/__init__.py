"""Training engines: pre-training and the captioner / filter / shared fine-tunings.

Modules (import from them by name; ``config`` is torch-free)::

    config   TrainConfig: one training section of params.yaml
    jobs     JOBS: what each job builds and the losses it optimises
    optim    param_groups, lr_at
    trainer  train(cfg, shards, out_dir, ...) -> summary
    state    resumable checkpoints
"""
