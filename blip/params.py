"""``params.yaml``, one owner: load, override, edit in place, validate, and return one typed :class:`Params`.

Everything that reads parameters goes through here — the stage commands (``--set``), the Prefect
flow (deployment parameters), DVC's ``dvc exp run -S`` edits the same file — so a dotted key is
parsed once (:func:`parse_overrides`), a mapping becomes a dataclass through one builder
(:func:`blip.typed.build`), and the
rules that derive one key from another live in one place (:func:`_derive`):

- ``caption.method`` is ``capfilt.decoding`` (Table 2);
- ``assemble.use_filter`` / ``assemble.use_captioner`` come from ``capfilt.parts`` (Table 1);
- ``assemble.score`` is ``capfilt.filter_score`` (ITM, DataComp's ITC cosine at ITM's kept count, or the
  ``oracle`` ceiling: the hidden noise labels decide the web texts, an evaluation instrument);
- a training section's ``job`` is its name (``repretrain`` trains like ``pretrain``, from scratch).

Setting a derived key by hand is an error naming the factor to set instead. Validation is whole and
early: an unknown section or key, a wrong type or a value outside the allowed ones fails with a
:class:`ParamsError` naming the dotted key and what is allowed, before any stage does work.

Defaults live in the section dataclasses, once (``TrainConfig``, ``CaptionConfig``, ...);
``params.yaml`` holds the values of a run. This module imports no torch: validating is cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .capfilt.config import (
    FILTER_SCORES,
    METHODS,
    PARTS,
    AssembleConfig,
    CaptionConfig,
    FilterConfig,
)
from .data.generator import GenerateConfig
from .model.config import PRESETS, SHARING_STRATEGIES, BlipConfig, load_preset
from .train.config import JOBS, TextWarmstartConfig, TrainConfig, WarmstartConfig
from .typed import ConfigError, build

CAPFILT_MODELS = ("decoupled", "shared")  # Table 4
FACTORS = ("capfilt.parts", "capfilt.decoding", "capfilt.models", "model.sharing")  # the ablation factors
TRAIN_SECTIONS = tuple(JOBS)  # a training section trains the job of its name
# keys another key decides; writing them by hand would contradict it
DERIVED = {"caption.method": "capfilt.decoding", "assemble.use_filter": "capfilt.parts",
           "assemble.use_captioner": "capfilt.parts", "assemble.score": "capfilt.filter_score", **{f"{s}.job": f"the section's name ({s})" for s in TRAIN_SECTIONS}}


ParamsError = ConfigError  # a parameter is missing, unknown or of the wrong type/value (names the key)


# -- the sections that belong to the pipeline (the engines' sections live beside their engines) -------


@dataclass
class ModelParams:
    """``model:`` — the architecture pre-training builds (fine-tunings inherit it)."""

    preset: str = "tiny"
    sharing: str = "all_except_sa"  # Table 3: all | all_except_ca | all_except_sa | none
    queue_size: int = 1024
    momentum: float = 0.995  # EMA rate of the momentum encoders (ITC targets, queue, distillation)
    temp: float = 0.07  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    vocab_size: int = 1024  # WordPiece vocabulary trained on the captions (ignored with vocab_file)
    vocab_file: str | None = None  # a BERT vocab.txt to use instead (e.g. bert-base-uncased)
    vision: dict = field(default_factory=dict)  # overrides of the preset's vision fields
    text: dict = field(default_factory=dict)  # overrides of the preset's text fields

    def __post_init__(self) -> None:
        _allowed("preset", self.preset, PRESETS)
        _allowed("sharing", self.sharing, SHARING_STRATEGIES)

    def config(self, special_ids: dict[str, int]) -> BlipConfig:
        """The model's ``BlipConfig`` for a tokenizer with these special-token ids (and its vocab size)."""
        return load_preset(self.preset, sharing=self.sharing, queue_size=self.queue_size, momentum=self.momentum,
                           temp=self.temp, vision=self.vision,
                           text={**self.text, **special_ids})


@dataclass
class CapfiltParams:
    """``capfilt:`` — the CapFilt ablation factors (Tables 1, 2 and 4)."""

    parts: str = "both"  # Table 1: none | filter | captioner | both
    decoding: str = "nucleus"  # Table 2: nucleus (p=0.9) | beam (3 beams)
    models: str = "decoupled"  # Table 4: decoupled (two fine-tunes) | shared (one model, LM+ITC+ITM)
    filter_score: str = "itm"  # itm (BLIP) | itc (DataComp's CLIP-score filter, at ITM's kept count) | oracle (labels)
    captioner: str | None = None  # a released checkpoint instead of the fine-tuned captioner (capfilt/sources.py)
    filter: str | None = None  # ... and instead of the fine-tuned filter: ours, an official .pth, transformers

    def __post_init__(self) -> None:
        _allowed("parts", self.parts, tuple(PARTS))
        _allowed("decoding", self.decoding, METHODS)
        _allowed("models", self.models, CAPFILT_MODELS)
        _allowed("filter_score", self.filter_score, FILTER_SCORES)

    @property
    def use_filter(self) -> bool:
        return PARTS[self.parts][0]

    @property
    def use_captioner(self) -> bool:
        return PARTS[self.parts][1]


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
    bf16: bool | str = False  # retrieval's ITC/ITM forwards under bfloat16 autocast (auto: where native)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.meteor not in ("auto", True, False):
            raise ValueError(f"meteor={self.meteor!r}: use auto, true or false")
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"bf16={self.bf16!r}: use auto, true or false")
        if self.k_test < 1:
            raise ValueError(f"k_test={self.k_test}: must be >= 1")


@dataclass
class ComputeParams:
    """``compute:`` — how stages launch. ``nproc_per_node`` > 1 (or ``auto`` = one per visible
    GPU) re-launches a training stage under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPU).
    ``ray_*``: where the shard stages run with ``executor: ray`` (``capfilt/ray_executor.py``):
    ``ray_address`` null (Ray's lookup: $RAY_ADDRESS, a ``ray start`` cluster on this host, else a
    new local Ray) | local | auto | host:port; GPUs and CPUs per actor (``auto``: one GPU each
    when the cluster has GPUs); ``ray_max_retries``: how often a shard is retried when its worker dies."""

    nproc_per_node: int | str = 1
    ray_address: str | None = None
    ray_gpus_per_worker: float | str = "auto"
    ray_cpus_per_worker: float = 1.0
    ray_max_retries: int = 3

    def __post_init__(self) -> None:
        if self.nproc_per_node != "auto" and not (isinstance(self.nproc_per_node, int) and self.nproc_per_node >= 1):
            raise ValueError(f"nproc_per_node={self.nproc_per_node!r}: an integer >= 1 or 'auto'")
        self.ray()  # validates the ray_* keys

    def ray(self):
        from .capfilt.ray_executor import RayOptions

        return RayOptions(self.ray_address, self.ray_gpus_per_worker, self.ray_cpus_per_worker, self.ray_max_retries)


@dataclass
class MlflowParams:
    """``mlflow:`` — the tracking store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""

    enabled: bool = True
    experiment: str = "blip-bootstrap"
    final_stage: str = "report"  # the stage whose end also ends the parent run (byod/: assemble)


def _train(job: str):
    return field(default_factory=lambda: TrainConfig(job=job))


@dataclass
class Params:
    """The whole of ``params.yaml``, typed. ``raw`` is the mapping it was built from (after
    overrides), kept for recording the run (MLflow params) exactly as written."""

    model: ModelParams = field(default_factory=ModelParams)
    capfilt: CapfiltParams = field(default_factory=CapfiltParams)
    data: DataParams = field(default_factory=DataParams)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    warmstart_vision: WarmstartConfig = field(default_factory=WarmstartConfig)
    warmstart_text: TextWarmstartConfig = field(default_factory=TextWarmstartConfig)
    pretrain: TrainConfig = _train("pretrain")
    finetune_captioner: TrainConfig = _train("finetune_captioner")
    finetune_filter: TrainConfig = _train("finetune_filter")
    finetune_shared: TrainConfig = _train("finetune_shared")
    repretrain: TrainConfig = _train("repretrain")
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def factors(self) -> dict[str, str]:
        """The four ablation factors (Tables 1-4): ``{"capfilt.parts": "both", ...}``."""
        return {k: str(getattr(getattr(self, k.split(".")[0]), k.split(".")[1])) for k in FACTORS}

    def train(self, section: str) -> TrainConfig:
        """The ``TrainConfig`` of training section ``section``."""
        if section not in TRAIN_SECTIONS:
            raise ParamsError(f"{section!r} is not a training section; training sections: {', '.join(TRAIN_SECTIONS)}")
        return getattr(self, section)


SECTIONS = tuple(f.name for f in dataclasses.fields(Params) if f.name != "raw")


# -- reading, overriding, validating --------------------------------------------------------------


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["pretrain.epochs=3", "capfilt.decoding=beam"]`` → ``{"pretrain.epochs": 3, ...}``; each value
    is parsed as YAML (``3`` → int, ``true`` → bool, ``[a, b]`` → list)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip() or "." not in key:
            raise ParamsError(f"override {item!r} must look like section.key=value, e.g. capfilt.decoding=beam")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def apply_overrides(mapping: dict, overrides: dict[str, Any], where: str = "params") -> dict:
    """Set each dotted key of ``overrides`` in the nested ``mapping`` (in place; also a ruamel
    document, so comments survive). A dict value is merged into an existing section; missing
    sections are created. Returns ``mapping``."""
    for key, value in overrides.items():
        node = mapping
        parts = str(key).split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ParamsError(f"override {key!r}: {p!r} is not a section of {where}")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            apply_overrides(node[parts[-1]], value, where)
        else:
            node[parts[-1]] = value
    return mapping


def read(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The raw mapping of a params file (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the project root or pass --params")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return raw


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """The validated :class:`Params` of the file at ``path`` with ``overrides`` (dotted keys, or
    ``KEY=VALUE`` strings) applied for this call only."""
    raw = read(path)
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    apply_overrides(raw, overrides or {}, str(path))
    try:
        return from_dict(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def from_dict(raw: dict[str, Any]) -> Params:
    """Validate a whole params mapping and build the typed :class:`Params` (derived keys filled in)."""
    unknown = [name for name in raw if name not in SECTIONS]
    if unknown:
        raise ParamsError(f"unknown section {unknown[0]!r} in params; allowed sections: {', '.join(sorted(SECTIONS))}")
    for key, factor in DERIVED.items():
        sec, _, k = key.partition(".")
        if isinstance(raw.get(sec), dict) and k in raw[sec]:
            raise ParamsError(f"{key} is set by {factor}; remove {key}" +
                              (f" and set {factor} instead" if factor in FACTORS else ""))
    params = build(Params, _derive(copy.deepcopy(raw)), "")
    params.raw = copy.deepcopy(raw)
    return params


def _derive(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill in the keys that other keys decide (the module docstring lists the rules)."""
    capfilt = build(CapfiltParams, raw.get("capfilt") or {}, "capfilt")
    raw["caption"] = {**(raw.get("caption") or {}), "method": capfilt.decoding}
    raw["assemble"] = {**(raw.get("assemble") or {}), "use_filter": capfilt.use_filter,
                       "use_captioner": capfilt.use_captioner, "score": capfilt.filter_score}
    for sec in TRAIN_SECTIONS:
        raw[sec] = {**(raw.get(sec) or {}), "job": sec}
    return raw


def _allowed(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} unknown; use one of {allowed}")


# -- editing the file in place ---------------------------------------------------------------------


def _yaml():
    # DVC's own YAML library: round-trips comments and layout
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 120
    return y


def edit(path: str | Path, overrides: dict[str, Any] | list[str]) -> Params:
    """Write ``overrides`` (dotted keys, nested dicts, or ``KEY=VALUE`` strings) into the file at
    ``path``, keeping its comments and layout. The result is validated before anything is written
    (a bad key leaves the file as it was). Returns the new :class:`Params`."""
    path = Path(path)
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    y = _yaml()
    doc = y.load(path.read_text())
    apply_overrides(doc, overrides, str(path))
    buf = io.StringIO()
    y.dump(doc, buf)
    try:
        params = from_dict(yaml.safe_load(buf.getvalue()))
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    path.write_text(buf.getvalue())
    return params


def variant_path(params_path: str | Path, name: str) -> Path:
    p = Path(params_path)
    return p.with_name(f"{p.stem}-{name}{p.suffix}")


def apply_variant(params_path: str | Path, name: str) -> Params:
    """Overlay ``params-<name>.yaml`` (only the keys that differ) onto ``params.yaml`` in place."""
    overlay_path = variant_path(params_path, name)
    if not overlay_path.is_file():
        stem = Path(params_path).stem
        have = sorted(q.stem.split("-", 1)[1] for q in Path(params_path).parent.glob(f"{stem}-*.yaml"))
        raise ParamsError(f"variant {name!r}: {overlay_path} not found; variants here: {have or 'none'}")
    return edit(params_path, yaml.safe_load(overlay_path.read_text()) or {})
