"""The typed sections of the CapFilt stages (``caption``, ``filter``, ``assemble`` in ``params.yaml``)
and the names they allow. Torch-free, so validating ``params.yaml`` stays cheap."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.shards import MAX_SHARD_SIZE
from ..model.config import GenerationConfig

EXECUTORS = ("thread", "process", "ray")
METHODS = ("nucleus", "beam")  # Table 2: the decodings of the synthetic captions
TEXT_MAX_LENGTH = 35  # BLIP's retrieval setting (blip-facts §1.8)
PARTS = {  # Table 1 names -> (use_filter, use_captioner)
    "none": (False, False),
    "filter": (True, False),
    "captioner": (False, True),
    "both": (True, True),
}
DEFAULT_THRESHOLD = 0.5
# what decides the kept texts: ITM p(match) (BLIP) | ITC cosine (DataComp) | oracle: the hidden noise labels decide
# the web texts, ITM the synthetic ones (the ceiling cell's evaluation instrument, not a filter)
FILTER_SCORES = ("itm", "itc", "oracle")
RULES = ("threshold", "top_k", "fraction", "replace")  # assemble.rule (selection.py)
RANK_SCORES = ("itm", "itc")
DEDUP_MODES = ("image", "url", "none")


def parts_name(use_filter: bool, use_captioner: bool) -> str:
    return {v: k for k, v in PARTS.items()}[(bool(use_filter), bool(use_captioner))]


def check_skipped(summary: dict, ceiling: float, stage: str) -> None:
    """Fail a shard stage whose input was mostly unusable: more than ``ceiling`` of its rows not
    ``ok`` (the results stay, counted by reason, so the rerun after a fix redoes nothing needlessly)."""
    status = dict(summary.get("status") or {})
    rows = sum(status.values())
    bad = {k: v for k, v in status.items() if k != "ok"}
    if not rows or sum(bad.values()) / rows <= ceiling:
        return
    top = ", ".join(f"{k} {v}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:3])
    damaged = ", ".join(f"{k} ({v})" for k, v in list((summary.get("shard_errors") or {}).items())[:3])
    raise ValueError(f"{stage}: {sum(bad.values())} of {rows} samples unusable ({sum(bad.values()) / rows:.0%} > the "
                     f"ceiling {ceiling:.0%}); top reasons: {top}" + (f"; damaged shards: {damaged}" if damaged else "")
                     + f". Every sample is named in the per-shard tables in {summary.get('out_dir')}; fix the data or "
                     f"raise {stage}.max_skipped_fraction")


def check_fan_out(workers: int, executor: str) -> None:
    """The fan-out settings every shard stage shares: shards in flight and how they run."""
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}: use one of {EXECUTORS}")


@dataclass
class CaptionConfig:
    """The ``caption`` section of ``params.yaml``.

    ``method``: ``nucleus`` (CapFilt: top_k 50 then top_p 0.9, BLIP's repetition penalty 1.1) or
    ``beam`` (``num_beams`` 3, no repetition penalty, as BLIP's ``generate``). ``top_k``: nucleus
    only, kept before top-p as transformers' default did for BLIP (0 = off). ``repetition_penalty``: CTRL's
    penalty on every token already in the caption (``None``: BLIP's, 1.1 nucleus, 1.0 beam).
    ``length_rule``: beam only, how finished captions are ranked: ``official`` (transformers 4.15, as BLIP's released
    captions) or ``transformers`` (5.x). ``max_length``/``min_length`` count the prompt's tokens,
    as BLIP's configs (20/5). ``seed``: nucleus sampling only. ``candidates``: nucleus samples per
    image (1: BLIP; BLIP-2 ranks 10, LAION-COCO 40), drawn in one pass over the image's cache, each
    from its own seed (``caption.candidate_seed``); the selection rule (``assemble.rule``) ranks them.
    How it runs (not part of the result's identity): ``batch_size``, ``device`` (auto | cpu |
    cuda | cuda:N), ``workers`` (shards in flight), ``executor`` (thread | process | ray: Ray
    actors, placed by ``compute.ray_*``), ``progress``.
    """

    method: str = "nucleus"
    top_p: float = 0.9
    top_k: int = 50
    num_beams: int = 3
    length_rule: str = "official"
    repetition_penalty: float | None = None  # None: BLIP's (1.1 nucleus, 1.0 beam)
    max_length: int = 20
    min_length: int = 5
    seed: int = 0
    candidates: int = 1
    batch_size: int = 32
    device: str = "auto"
    workers: int = 1
    executor: str = "thread"
    progress: bool = True
    max_skipped_fraction: float = 0.2  # fail when more of the web samples are unusable (img2dataset: ~0-5%)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {METHODS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if not 1 <= self.candidates <= 256:
            raise ValueError(f"candidates={self.candidates}: captions per image, 1..256")
        if self.candidates > 1 and self.method != "nucleus":
            raise ValueError(f"candidates={self.candidates} with decoding {self.method}: beam search gives one caption "
                             "per image; sample several with capfilt.decoding nucleus")
        check_fan_out(self.workers, self.executor)
        GenerationConfig(top_k=self.top_k, length_rule=self.length_rule)  # both checked, whatever the method
        self.generation()  # validates top_p, num_beams

    def generation(self) -> GenerationConfig:
        """Each method gets only its own knobs, so the other method's do not change ``identity()``."""
        rep = {} if self.repetition_penalty is None else {"repetition_penalty": self.repetition_penalty}
        if self.method == "nucleus":
            return GenerationConfig.nucleus(max_length=self.max_length, min_length=self.min_length, top_p=self.top_p,
                                            top_k=self.top_k, **rep)
        return GenerationConfig(method="beam", num_beams=self.num_beams, max_length=self.max_length,
                                min_length=self.min_length, length_rule=self.length_rule, **rep)

    def identity(self) -> dict:
        """The fields that decide the captions (the whole generation config, top_k and
        length_rule included, so changing them recomputes the shards)."""
        d = {"generation": asdict(self.generation())}
        if self.method == "nucleus":
            d["seed"] = self.seed
        if self.candidates != 1:  # absent at 1, so BLIP's one-caption tables stay valid
            d["candidates"] = self.candidates
        return d


@dataclass
class FilterConfig:
    """The ``filter`` section of ``params.yaml``. ``max_length``: text tokens (35, retrieval).
    How it runs (not part of the result's identity): ``batch_size`` (images per ViT pass; twice
    as many texts per ITM pass), ``device``, ``workers``, ``executor``, ``progress``.
    The keep/drop threshold is not here: it belongs to ``assemble`` (``selection.select``)."""

    max_length: int = TEXT_MAX_LENGTH
    batch_size: int = 64
    device: str = "auto"
    workers: int = 1
    executor: str = "thread"
    progress: bool = True
    max_skipped_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.max_length < 3 or self.batch_size < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 3 and batch_size={self.batch_size} >= 1")
        check_fan_out(self.workers, self.executor)


@dataclass
class AssembleConfig:
    """The ``assemble`` section of ``params.yaml``: the CapFilt parts (Table 1) and the threshold.
    ``score``: what the filter thresholds — ``itm`` (BLIP) or ``itc`` (the DataComp baseline: the
    lowest ITC cosines, as many texts as ITM drops at ``threshold``; ``selection.itc_cut``), or
    ``oracle`` (an evaluation instrument, not a filter: the generator's hidden noise labels decide
    the web texts, ITM the synthetic ones; generated data only — ``assemble._oracle_labels``).
    ``use_filter``: drop texts with ITM p(match) < ``threshold``; ``use_captioner``: add the
    synthetic captions. ``max_shard_samples``: samples per output tar (<= 10000, 4-digit index).
    ``web_metadata``: keep the web samples' own metadata (img2dataset's ``url``, sizes, ...).
    ``rule``: threshold (BLIP) | top_k (BLIP-2: ``top_k`` per image) | fraction (DataComp: the
    best ``fraction`` of all texts) | replace (Nguyen et al.: a rejected web text replaced by the
    best passing candidate); ``rank_score`` (itm | itc) ranks for the last three
    (``selection`` says exactly what each keeps). ``dedup``: image (exact duplicates by image
    bytes) | url (by the web sample's url) | none — the first copy kept, the rest counted."""

    threshold: float = DEFAULT_THRESHOLD
    rule: str = "threshold"
    top_k: int = 2
    fraction: float = 0.3
    rank_score: str = "itc"
    dedup: str = "none"
    score: str = "itm"  # itm: p(match) >= threshold | itc: cosine, dropping as many as ITM does | oracle: labels
    use_filter: bool = True
    use_captioner: bool = True
    max_shard_samples: int = MAX_SHARD_SIZE
    web_metadata: bool = False  # carry each web sample's own .json (url, sizes, ...) into the output
    workers: int = 1
    executor: str = "thread"
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold}: a probability, in [0, 1]")
        if not 1 <= self.max_shard_samples <= MAX_SHARD_SIZE:
            raise ValueError(f"max_shard_samples={self.max_shard_samples}: must be in 1..{MAX_SHARD_SIZE}")
        if self.score not in FILTER_SCORES:
            raise ValueError(f"score={self.score!r} unknown; use one of {FILTER_SCORES}")
        if self.rule not in RULES:
            raise ValueError(f"assemble.rule={self.rule!r} unknown; use one of {RULES}")
        if self.rank_score not in RANK_SCORES:
            raise ValueError(f"assemble.rank_score={self.rank_score!r}: use one of {RANK_SCORES}")
        if self.top_k < 1:
            raise ValueError(f"assemble.top_k={self.top_k}: texts kept per image, >= 1")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"assemble.fraction={self.fraction}: the share of all texts kept, in (0, 1]")
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"assemble.dedup={self.dedup!r}: use one of {DEDUP_MODES}")
        if self.score == "oracle" and self.rule != "threshold":
            raise ValueError(f"capfilt.filter_score=oracle decides web texts by the hidden labels; it has no scores to "
                             f"rank, so it runs with assemble.rule threshold, not {self.rule}")
        check_fan_out(self.workers, self.executor)
        if self.executor == "ray":
            raise ValueError("assemble.executor=ray: assembling reads the score tables and writes the new shards where "
                             "they live; run it with thread or process (caption and filter are the stages for Ray)")

    @property
    def parts(self) -> str:
        """Table 1's name for this setting: none | filter | captioner | both."""
        return parts_name(self.use_filter, self.use_captioner)

    @classmethod
    def for_parts(cls, parts: str, **kw) -> AssembleConfig:
        if parts not in PARTS:
            raise ValueError(f"parts={parts!r}: use one of {list(PARTS)}")
        use_filter, use_captioner = PARTS[parts]
        return cls(use_filter=use_filter, use_captioner=use_captioner, **kw)
