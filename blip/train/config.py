"""Typed configuration of one training job (a section of ``params.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..model.config import ITM_NEGATIVES, ITM_NEGATIVES_FROM

SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class Job:
    """What a training job builds and optimises. ``model``: the class it trains (``BlipPretrain``
    from scratch, else initialised from a checkpoint); ``objective``: which forward pass —
    ``pretrain`` (ITC + ITM + LM), ``lm`` (captioner), ``retrieval`` (ITC + ITM with positives by
    image id), ``shared`` (all three with image ids, Table 4's one model)."""

    model: str
    objective: str
    from_scratch: bool = False


#: every training job, by name; a training section of params.yaml trains the job of its name
JOBS = {
    "pretrain": Job("BlipPretrain", "pretrain", from_scratch=True),  # the noisy-data baseline
    "repretrain": Job("BlipPretrain", "pretrain", from_scratch=True),  # a new model on the bootstrapped data
    "finetune_captioner": Job("BlipCaptioner", "lm"),
    "finetune_filter": Job("BlipRetrieval", "retrieval"),
    "finetune_shared": Job("BlipPretrain", "shared"),  # Table 4: one model as captioner and filter
}


@dataclass
class TrainConfig:
    """One training job. Defaults are BLIP's (blip-facts §1.14-1.15) where they exist.

    ``batch_size`` is the global batch per optimizer step (all ranks, all accumulation
    micro-batches). With ``grad_accum_steps = k`` each rank runs ``k`` micro-batches of
    ``batch_size / (world_size * k)`` pairs; ITC then takes its in-batch negatives from one
    micro-batch (of every rank) plus the feature queue, which holds the momentum features of the
    previous micro-batches — the contrastive batch is the micro-batch, not the step batch, and
    the trainer says so when it starts. ITM hard negatives come from the local micro-batch.
    """

    job: str = "pretrain"
    epochs: int = 20
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 3e-4  # init_lr
    vision_lr_scale: float = 1.0  # the ViT's lr as a fraction of lr (a warm ViT beside text towers from scratch); 0: frozen
    cross_lr_scale: float = 1.0  # the cross-attention layers' and the ITM head's lr as a multiple of lr
    itm_weight: float = 1.0  # the ITM loss's weight in the sum of the job's losses (BLIP: 1)
    vision_cache_mib: int = 2048  # a frozen ViT on a deterministic transform: its tokens computed once per image (0: off)
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000  # linear warm-up in epoch 0 (step schedule)
    lr_decay_rate: float = 0.9  # step schedule: lr = max(min_lr, lr * rate ** epoch)
    schedule: str = "step"  # step (pre-training) | cosine (fine-tuning, per epoch)
    weight_decay: float = 0.05
    alpha: float = 0.4
    alpha_ramp_epochs: float = 2.0  # distillation weight ramps in over this many epochs
    max_text_len: int = 30  # 30 pre-training, 35 retrieval, 40 captioning (blip-facts §1.6, §1.8)
    min_scale: float = 0.2  # random-resized-crop scale: 0.2 pre-training, 0.5 fine-tuning
    image_size: int | None = None  # pixels; None: the model's. BLIP fine-tunes at 384 what it pre-trained at 224
    max_skipped_fraction: float = 0.2  # fail when more of the samples read are unusable (img2dataset web data: ~0-5%)
    augment: bool = True  # horizontal flip + RandomAugment(2, 5) after the crop (BLIP's train transform)
    negative_all_rank: bool = False  # retrieval ITM negatives from every rank (COCO: True)
    itm_negatives: str = "hard"  # hard (BLIP's) | uniform | below_positive: how ITM draws its negatives (model/losses.py)
    itm_negatives_from: str = "batch"  # batch (BLIP's) | queue: negative texts also from the ITC queue's (retrieval jobs)
    itm_negatives_per_pair: int = 1  # ITM negatives of each kind per positive (BLIP: 1), each weighing 1/k
    bf16: bool | str = False  # autocast matmuls to bfloat16; auto = where the device does bf16 natively
    grad_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # data loader processes per rank
    ckpt_every: int = 200  # optimizer steps between resumable checkpoints (and at every epoch end)
    log_every: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ValueError(f"job={self.job!r} unknown; use one of {tuple(JOBS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} unknown; use one of {SCHEDULES}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"bf16={self.bf16!r}: use true, false or auto")
        for name in ("epochs", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"itm_negatives={self.itm_negatives!r} unknown; use one of {ITM_NEGATIVES}")
        if self.itm_negatives_from not in ITM_NEGATIVES_FROM:
            raise ValueError(f"itm_negatives_from={self.itm_negatives_from!r} unknown; use one of {ITM_NEGATIVES_FROM}")
        if self.itm_negatives_from != "batch" and JOBS[self.job].objective != "retrieval":
            raise ValueError(f"itm_negatives_from={self.itm_negatives_from!r}: only the filter's fine-tune "
                             f"(a retrieval job) draws ITM negatives from the queue; {self.job!r} takes 'batch'")
        if self.itm_negatives_per_pair < 1:
            raise ValueError(f"itm_negatives_per_pair={self.itm_negatives_per_pair}: negatives of each kind per "
                             "positive, >= 1 (1: BLIP's)")
        if self.itm_negatives_per_pair > 1 and self.negative_all_rank:
            raise ValueError("itm_negatives_per_pair > 1 draws from this rank's batch; set negative_all_rank: false "
                             "(or itm_negatives_per_pair: 1)")
        if not 0.0 <= self.vision_lr_scale <= 10.0:
            raise ValueError(f"vision_lr_scale={self.vision_lr_scale}: the ViT's lr as a fraction of lr, in [0, 10] "
                             "(0: the ViT frozen)")
        if not 0.0 < self.cross_lr_scale <= 100.0:
            raise ValueError(f"cross_lr_scale={self.cross_lr_scale}: the cross-attention's and ITM head's lr "
                             "as a multiple of lr, in (0, 100]")
        if self.vision_cache_mib < 0:
            raise ValueError(f"vision_cache_mib={self.vision_cache_mib}: MiB of frozen-ViT tokens kept, >= 0 (0: off)")
        if self.itm_weight < 0:
            raise ValueError(f"itm_weight={self.itm_weight}: the ITM loss's weight, >= 0 (1: BLIP's sum)")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction={self.max_skipped_fraction}: a fraction in [0, 1] (1: never fail)")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size={self.image_size}: pixels, >= 16 (null: the model's own)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _WarmStart:
    """What both warm starts share (``warmstart.warm_start_loop``): ``held_out`` of the set's
    ``size()`` items only measure; ``seed`` is the set's world seed and the training seed;
    ``enabled: false`` skips the stage (it writes a SKIPPED.json marker)."""

    enabled: bool = True
    held_out: int = 500
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    seed: int = 0
    bf16: bool | str = "auto"
    device: str = "auto"
    progress: bool = True

    def size(self) -> tuple[str, int]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        name, n = self.size()
        if n <= self.held_out or self.held_out < 1:
            raise ValueError(f"{name}={n}, held_out={self.held_out}: need 1 <= held_out < {name}")
        for name in ("epochs", "batch_size", *(("max_text_len",) if hasattr(self, "max_text_len") else ())):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class TextWarmstartConfig(_WarmStart):
    """``warmstart_text:`` in params.yaml: the text transformer's MLM warm start
    (``warmstart_text.py``, BERT's role); ``captions``: the corpus size. Off by default (measured,
    not taken: docs/recipe.md)."""

    enabled: bool = False
    captions: int = 20000
    held_out: int = 1000
    epochs: int = 4
    batch_size: int = 128
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_text_len: int = 30

    def size(self) -> tuple[str, int]:
        return "captions", self.captions


@dataclass(frozen=True)
class WarmstartConfig(_WarmStart):
    """``warmstart_vision:`` in params.yaml: the ViT's supervised warm start (``warmstart.py``);
    ``images``: the labelled images; ``eval_every``: measure the held-out AUCs every that many
    steps too (0: at the end only), a learning curve in the metrics file and MLflow."""

    images: int = 6000
    eval_every: int = 0

    def size(self) -> tuple[str, int]:
        return "images", self.images
