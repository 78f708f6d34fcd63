"""Training engines: pre-training and the captioner / filter / retrieval fine-tunings."""

from .config import JOBS, TrainConfig
from .jobs import ARCH, build_model, compute_losses
from .optim import lr_at, param_groups
from .trainer import train

__all__ = ["JOBS", "TrainConfig", "ARCH", "build_model", "compute_losses", "lr_at", "param_groups", "train"]
