"""The stage registry: every stage of the bootstrap, once.

A :class:`Stage` names its function, the ``params.yaml`` keys it reads (what ``dvc.yaml`` lists
under ``params:``, checked by ``tests/test_stages.py``), its training section and job, the models it
records, and its paths (the command line's options, the function's keyword arguments). The CLI
builds its parsers from here, MLflow records each stage's sections from here, and the test holds
``dvc.yaml`` to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..train.config import JOBS
from . import capfilt, data, evaluate, train


@dataclass(frozen=True)
class Arg:
    """A path option of a stage (``--name``; the function's keyword ``name`` with ``-`` → ``_``)."""

    name: str
    help: str
    required: bool = False
    many: bool = False  # one or more values (shard folders/patterns)
    default: str | None = None
    dest: str | None = None  # keyword name, when it differs from the option's

    @property
    def key(self) -> str:
        """The function's keyword (and argparse ``dest``) for this option."""
        return self.dest or self.name.replace("-", "_")


@dataclass(frozen=True)
class ModelLog:
    """A model a training stage records: artifact folder ``name``, its ``role`` (captioner | filter |
    None: weights only), a transformers export beside it (``hf``), and the registered model it
    becomes a version of (``register``)."""

    name: str = "model"
    role: str | None = None
    hf: bool = False
    register: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    help: str
    reads: tuple[str, ...]  # params.yaml keys (sections or dotted keys) this stage depends on
    args: tuple[Arg, ...]
    section: str | None = None  # training stages: the params section, which is also the job
    models: tuple[ModelLog, ...] = ()

    @property
    def job(self) -> str | None:
        return self.section

    @property
    def model_class(self) -> str | None:
        """The class the stage trains (``BlipPretrain``, ``BlipCaptioner``, ``BlipRetrieval``)."""
        return JOBS[self.section].model if self.section else None

    @property
    def logs(self) -> tuple[str, ...]:
        """The params sections recorded with the stage's MLflow run: the sections it reads."""
        return tuple(dict.fromkeys(key.split(".")[0] for key in self.reads))

    @property
    def trains(self) -> bool:
        return self.section is not None


SHARDS = Arg("shards", "shard folders/patterns", required=True, many=True)
OUT = Arg("out", "output folder", required=True)


def _train_args() -> tuple[Arg, ...]:
    return (SHARDS, Arg("out", "folder for the trained model (+ tokenizer)", required=True),
            Arg("init", "model folder to start from (fine-tuning)"),
            Arg("tokenizer", "tokenizer folder (training from scratch)"),
            Arg("vision-init", "ViT warm start folder (the warmstart_vision stage; training from scratch)"),
            Arg("text-init", "text warm start folder (the warmstart_text stage; training from scratch)"),
            Arg("metrics", "write the run summary JSON here"),
            Arg("log", "append per-step metrics as JSON lines here"),
            Arg("plot", "write per-step losses as CSV here (dvc plots)"))


def _training(name: str, section: str, help: str, reads: tuple[str, ...], *models: ModelLog) -> Stage:
    return Stage(name, train.train, help, reads, _train_args(), section=section, models=models)


CAPTIONER = ModelLog("model", role="captioner", hf=True, register="blip-captioner")
FILTER = ModelLog("model", role="filter", register="blip-filter")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", data.data, "generate the embedded world's splits", ("generate",),
          (Arg("out", "output folder", default="data/generated"),)),
    Stage("tokenizer", data.tokenizer, "WordPiece on the caption corpus, or model.vocab_file",
          ("model.vocab_size", "model.vocab_file"), (SHARDS, OUT)),
    Stage("warmstart_vision", train.warmstart_vision,
          "the ViT's supervised warm start on a labelled image set of the world (the ImageNet role)",
          ("warmstart_vision", "model.preset", "model.vision", "generate.world"),
          (Arg("out", "folder for the warm-start ViT", required=True), Arg("metrics", "write its summary JSON here"))),
    Stage("warmstart_text", train.warmstart_text,
          "the text transformer's MLM warm start on a caption corpus of the world (the BERT role)",
          ("warmstart_text", "model.preset", "model.text", "model.vocab_size", "model.vocab_file", "generate.world"),
          (Arg("tokenizer", "tokenizer folder", required=True), Arg("out", "folder for the warm-start text transformer",
                                                                    required=True),
           Arg("metrics", "write its summary JSON here"))),
    _training("pretrain", "pretrain", "ITC + ITM + LM on noisy web + human pairs: the noisy-data baseline",
              ("model", "pretrain", "compute", "warmstart_vision.enabled")),
    _training("finetune_captioner", "finetune_captioner", "LM on human pairs: the CapFilt captioner",
              ("finetune_captioner", "compute"), CAPTIONER),
    _training("finetune_filter", "finetune_filter", "ITC + ITM on human pairs: the CapFilt filter",
              ("finetune_filter", "compute"), FILTER),
    _training("finetune_shared", "finetune_shared",
              "Table 4's shared captioner+filter (a SKIPPED.json marker unless capfilt.models is shared)",
              ("finetune_shared", "capfilt.models", "compute"), CAPTIONER, ModelLog("model-filter", role="filter",
                                                                               register="blip-filter")),
    Stage("caption", capfilt.caption, "one synthetic caption per web image",
          ("caption", "capfilt.parts", "capfilt.decoding", "capfilt.models", "capfilt.captioner", "model.vocab_file"),
          (Arg("captioner", "fine-tuned captioner folder", required=True),
           Arg("shared", "the shared captioner+filter (used when capfilt.models=shared)"), SHARDS,
           Arg("out", "folder of per-shard caption tables (parquet)", required=True))),
    Stage("filter", capfilt.filter, "ITM/ITC scores of every web and synthetic text",
          ("filter", "capfilt.models", "capfilt.filter", "model.vocab_file"),
          (Arg("filter", "fine-tuned filter folder", required=True),
           Arg("shared", "the shared captioner+filter (used when capfilt.models=shared)"), SHARDS,
           Arg("captions", "the caption stage's output (omit: web texts only)"),
           Arg("out", "folder of per-shard score tables (parquet)", required=True))),
    Stage("assemble", capfilt.assemble, "human + kept web + kept synthetic pairs -> new shards",
          ("assemble", "capfilt.parts", "capfilt.filter_score"),
          (Arg("human", "human shard folders (omit: your own web shards alone)", many=True),
           Arg("web", "web shard folders", required=True, many=True),
           Arg("scores", "the filter stage's output", required=True),
           Arg("out", "folder for the bootstrapped shards", required=True),
           Arg("stats", "also write the dataset statistics JSON here"),
           Arg("gallery", "also draw the CapFilt gallery PNG here"))),
    Stage("filter_quality", capfilt.filter_quality, "the filter against the generator's hidden noise labels",
          ("assemble.threshold",),
          (Arg("scores", "the filter stage's output", required=True),
           Arg("web", "web shard folders", required=True, many=True), Arg("out", "metrics JSON", required=True),
           Arg("gallery", "also draw the CapFilt gallery PNG here (web and synthetic texts, kept and dropped)"))),
    _training("repretrain", "repretrain", "a new model from scratch on the bootstrapped dataset",
              ("model", "repretrain", "compute", "warmstart_vision.enabled"), ModelLog("model")),
    _training("downstream_captioner", "finetune_captioner", "the CapFilt model fine-tuned as the baseline's captioner",
              ("finetune_captioner", "compute"), ModelLog("model", hf=True)),
    _training("downstream_retrieval", "finetune_filter", "the CapFilt model fine-tuned as the baseline's filter",
              ("finetune_filter", "compute"), ModelLog("model")),
    Stage("evaluate", evaluate.evaluate, "retrieval (fine-tuned + zero-shot) and captioning metrics", ("evaluate",),
          (Arg("retrieval", "fine-tuned retrieval model folder"), Arg("captioner", "fine-tuned captioner folder"),
           Arg("data", "data root with the eval splits and annotations/", required=True),
           Arg("out", "metrics JSON", required=True), Arg("predictions", "also write the generated captions here"),
           Arg("ranks", "also write the per-query retrieval ranks JSON here (the report's bootstrap intervals)"))),
    Stage("report", evaluate.report, "side-by-side report of the evaluations; ends the MLflow bootstrap run",
          ("capfilt", "model.sharing", "model.preset"),
          (Arg("metrics", "NAME=PATH evaluation files", required=True, many=True),
           Arg("dataset-stats", "the assemble stage's statistics JSON"),
           Arg("filter-quality", "the filter_quality stage's JSON"),
           Arg("ranks", "NAME=PATH per-query ranks of two evaluations (evaluate --ranks), baseline first: "
                        "paired bootstrap intervals of their difference", many=True),
           Arg("gallery", "the CapFilt gallery PNG (filter_quality --gallery), linked from the report"),
           Arg("dataset", "the bootstrapped dataset folder (its dvc.lock md5 is tagged)"),
           Arg("lock", "dvc.lock to read the dataset's md5 from", default="dvc.lock"),
           Arg("json", "also write all numbers as one JSON here", dest="json_out"),
           Arg("out", "markdown report", required=True))),
)}
