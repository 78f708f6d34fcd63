"""The schema of ``params.yaml``: one typed dataclass per section, validated all at once.

``validate(params)`` checks every section before any stage does work: an unknown section or key,
a value of the wrong type or outside the allowed values fails with a :class:`ParamsError` naming
the dotted key and what is allowed. The CapFilt ablation factors (DESIGN.md) live in one section,
``capfilt``, and the stage configs derive from it (``caption.method`` ← ``capfilt.decoding``,
``assemble.use_filter/use_captioner`` ← ``capfilt.parts``), so a factor is set in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .params import ParamsError, build, section

TRAIN_SECTIONS = {  # params section -> training job
    "pretrain": "pretrain",
    "finetune_captioner": "finetune_captioner",
    "finetune_filter": "finetune_filter",
    "finetune_retrieval": "finetune_retrieval",
    "finetune_shared": "finetune_shared",
    "repretrain": "pretrain",
}
DECODINGS = ("nucleus", "beam")
CAPFILT_MODELS = ("decoupled", "shared")
# keys that a factor of the ``capfilt`` section sets; writing them by hand would contradict it
DERIVED = {"caption.method": "capfilt.decoding", "assemble.use_filter": "capfilt.parts",
           "assemble.use_captioner": "capfilt.parts"}


@dataclass
class ModelParams:
    """``model:`` — the architecture pre-training builds (fine-tunings inherit it)."""

    preset: str = "tiny"
    sharing: str = "all_except_sa"  # Table 3: all | all_except_ca | all_except_sa | none
    queue_size: int = 1024
    vocab_size: int = 1024  # WordPiece vocabulary trained on the captions (ignored with vocab_file)
    vocab_file: str | None = None  # a BERT vocab.txt to use instead (e.g. bert-base-uncased)
    vision: dict = field(default_factory=dict)  # overrides of the preset's vision fields
    text: dict = field(default_factory=dict)  # overrides of the preset's text fields

    def __post_init__(self) -> None:
        from .model import PRESETS, SHARING_STRATEGIES

        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} unknown; use one of {PRESETS}")
        if self.sharing not in SHARING_STRATEGIES:
            raise ValueError(f"sharing={self.sharing!r} unknown; use one of {SHARING_STRATEGIES}")


@dataclass
class CapfiltParams:
    """``capfilt:`` — the CapFilt ablation factors (Tables 1, 2 and 4)."""

    parts: str = "both"  # none | filter | captioner | both
    decoding: str = "nucleus"  # nucleus (p=0.9) | beam (3 beams)
    models: str = "decoupled"  # decoupled: two fine-tunes; shared: one model with LM+ITC+ITM

    def __post_init__(self) -> None:
        from .capfilt.selection import PARTS

        for name, allowed in (("parts", tuple(PARTS)), ("decoding", DECODINGS), ("models", CAPFILT_MODELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} unknown; use one of {allowed}")

    @property
    def use_filter(self) -> bool:
        return self.parts in ("filter", "both")

    @property
    def use_captioner(self) -> bool:
        return self.parts in ("captioner", "both")


@dataclass
class DataParams:
    """``data:`` — where the splits are. The ``data`` stage generates them into ``root``; for real
    data import COCO/Flickr with ``python -m blip.data import-*``, ``dvc add`` the folders and point
    ``root`` (human/ val/ test/ zeroshot/ annotations/) and ``web`` (img2dataset shards) at them."""

    root: str = "data/generated"
    web: str = "data/generated/web"


@dataclass
class EvaluateParams:
    """``evaluate:`` — downstream evaluation of a fine-tuned model pair."""

    k_test: int = 128  # ITC candidates reranked by ITM (BLIP: 256 COCO, 128 Flickr)
    retrieval_splits: list = field(default_factory=lambda: ["test", "zeroshot"])
    caption_split: str = "test"
    batch_size: int = 64
    meteor: bool | str = "auto"  # auto (when Java is there) | true | false (METEOR needs Java)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.meteor not in ("auto", True, False):
            raise ValueError(f"meteor={self.meteor!r}: use auto, true or false")
        if self.k_test < 1:
            raise ValueError(f"k_test={self.k_test}: must be >= 1")


@dataclass
class ComputeParams:
    """``compute:`` — how training stages launch. ``nproc_per_node`` > 1 (or ``auto`` = one per
    visible GPU) re-launches the stage under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPU)."""

    nproc_per_node: int | str = 1

    def __post_init__(self) -> None:
        if self.nproc_per_node != "auto" and not (isinstance(self.nproc_per_node, int) and self.nproc_per_node >= 1):
            raise ValueError(f"nproc_per_node={self.nproc_per_node!r}: an integer >= 1 or 'auto'")


@dataclass
class MlflowParams:
    """``mlflow:`` — the tracking store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""

    enabled: bool = True
    experiment: str = "blip-bootstrap"


def _schema() -> dict[str, type]:
    from .capfilt import AssembleConfig, CaptionConfig, FilterConfig
    from .data import GenerateConfig

    return {"model": ModelParams, "capfilt": CapfiltParams, "data": DataParams, "generate": GenerateConfig,
            "caption": CaptionConfig, "filter": FilterConfig, "assemble": AssembleConfig,
            "evaluate": EvaluateParams, "compute": ComputeParams, "mlflow": MlflowParams}


def validate(params: dict[str, Any]) -> None:
    """Every section of ``params`` against its dataclass; raises ``ParamsError`` naming the key."""
    schema = _schema()
    known = sorted([*schema, *TRAIN_SECTIONS])
    for name in params:
        if name not in schema and name not in TRAIN_SECTIONS:
            raise ParamsError(f"unknown section {name!r} in params; allowed sections: {', '.join(known)}")
    for name in schema:
        if name in params:
            _check_derived(params, name)
            _build(params, name)
    for name in TRAIN_SECTIONS:
        if name in params:
            train_config(params, name)


def _check_derived(params: dict[str, Any], name: str) -> None:
    for key, factor in DERIVED.items():
        sec, _, k = key.partition(".")
        if sec == name and k in (params.get(name) or {}):
            raise ParamsError(f"{key} is set by {factor}; remove {key} and set {factor} instead")


def _raw(params: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of section ``name``; an absent optional section means all defaults."""
    return section(params, name) if name in params else {}


def _build(params: dict[str, Any], name: str):
    return build(_schema()[name], _raw(params, name), name)


def capfilt(params: dict[str, Any]) -> CapfiltParams:
    return _build(params, "capfilt")


def model_params(params: dict[str, Any]) -> ModelParams:
    return build(ModelParams, section(params, "model"), "model")  # required: it fixes the architecture


def train_config(params: dict[str, Any], sec_name: str):
    """The ``TrainConfig`` of training section ``sec_name`` (its job is implied by the section)."""
    from .train import TrainConfig

    job = TRAIN_SECTIONS[sec_name]
    sec = section(params, sec_name)
    sec.setdefault("job", job)
    if sec["job"] != job:
        raise ParamsError(f"{sec_name}.job={sec['job']!r}: section {sec_name} trains job {job!r}")
    return build(TrainConfig, sec, sec_name)


def caption_config(params: dict[str, Any]):
    from .capfilt import CaptionConfig

    _check_derived(params, "caption")
    return build(CaptionConfig, {**_raw(params, "caption"), "method": capfilt(params).decoding}, "caption")


def filter_config(params: dict[str, Any]):
    return _build(params, "filter")


def assemble_config(params: dict[str, Any]):
    from .capfilt import AssembleConfig

    _check_derived(params, "assemble")
    cf = capfilt(params)
    return build(AssembleConfig, {**_raw(params, "assemble"), "use_filter": cf.use_filter,
                                  "use_captioner": cf.use_captioner}, "assemble")


def evaluate_params(params: dict[str, Any]) -> EvaluateParams:
    return _build(params, "evaluate")


def generate_config(params: dict[str, Any]):
    return _build(params, "generate")


def compute_params(params: dict[str, Any]) -> ComputeParams:
    return _build(params, "compute")
