"""Typed model configs and the size presets (``tiny``, ``small``, ``base``, ``large``).

Presets are data (``presets/*.json``) mapped onto these dataclasses, as in open_clip. Every
dataclass is built through :func:`blip.typed.build`, which rejects unknown keys by name, so a typo in a
preset or in ``params.yaml`` fails at load time instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..typed import ConfigError, build

#: How ITM draws its negative of each kind (``itm_negatives`` in every section that trains ITM;
#: ``losses.itm_negative_weights``): ``hard`` BLIP's (§3.4: in proportion to softmax of the ITC
#: similarity); ``uniform`` any other pair of the batch alike; ``below_positive`` hard, but only
#: among the candidates the ITC model finds *less* similar than the pair's own — in a world of
#: short, partial captions the most similar "negative" is often a text that also describes the
#: image (a false negative), and those sit at or above the positive's own similarity
#: (docs/recipe.md §0.7). Here, not in ``losses``, so configs check it without importing torch.
ITM_NEGATIVES = ("hard", "uniform", "below_positive")
#: Where ITM's negative texts are drawn from (``itm_negatives_from``): ``batch`` (BLIP's) or
#: ``queue``, the batch and the texts behind the ITC queue (``model.queue_size`` more candidates,
#: so that an image's nearest other caption is more often one that differs in a single detail).
ITM_NEGATIVES_FROM = ("batch", "queue")

SHARING_STRATEGIES = ("all", "all_except_ca", "all_except_sa", "none")
PRESETS = ("tiny", "small", "base", "large")
GENERATION_METHODS = ("beam", "nucleus", "greedy")
LENGTH_RULES = ("official", "transformers")  # beam search: how a finished caption's log-prob is normalised


@dataclass
class VisionConfig:
    """ViT as in BLIP's ``vit.py``: class token, pre-norm blocks, qkv bias, LayerNorm eps 1e-6."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    grad_checkpointing: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder emits per image: class token + patches."""
        return 1 + self.grid * self.grid


@dataclass
class TextConfig:
    """BERT-style MED text transformer (``med.py``). Token ids come from the tokenizer."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    add_cross_attention: bool = True
    tie_word_embeddings: bool = True
    grad_checkpointing: bool = False
    # Special tokens (bert-base-uncased + BLIP's two added tokens).
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    bos_token_id: int = 30522  # [DEC]: position 0 of every decoder input
    enc_token_id: int = 30523  # [ENC]: position 0 of every image-grounded encoder input


@dataclass
class BlipConfig:
    """Everything needed to build a BLIP model; saved as ``config.json`` beside the weights."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection size (§3.2)
    queue_size: int = 57600  # ITC feature queue length (pretrain.yaml)
    momentum: float = 0.995  # EMA of the momentum encoders
    temp: float = 0.07  # initial ITC temperature, clamped to [0.001, 0.5]
    label_smoothing: float = 0.1  # LM loss
    sharing: str = "all_except_sa"  # Table 3: BLIP shares all but self-attention
    prompt: str = "a picture of "  # captioner prompt, masked out of the LM loss
    preset: str = ""  # the preset this config came from (informational)

    def __post_init__(self) -> None:
        if self.sharing not in SHARING_STRATEGIES:
            raise ValueError(
                f"sharing={self.sharing!r} is not a sharing strategy; use one of {SHARING_STRATEGIES}"
            )

    @property
    def encoder_width(self) -> int:
        """Cross-attention key/value input size: the ViT width."""
        return self.vision.width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlipConfig":
        """Build from a mapping (a preset, a checkpoint's config.json); unknown keys fail by name."""
        return build(cls, d)


@dataclass
class GenerationConfig:
    """How captions are decoded; defaults are BLIP's ``generate`` (beam 3, lengths 5..20).

    ``max_length``/``min_length`` count the prompt's tokens ([DEC] a picture of = 4), as BLIP's
    configs and transformers' ``generate`` do.

    Nucleus sampling: ``top_k`` then ``top_p``, as transformers' TopKLogitsWarper and
    TopPLogitsWarper. BLIP passes only ``top_p=0.9``, so its captions ran with transformers'
    default ``top_k=50`` too; ``top_k=0`` turns the top-k cut off (top-p alone).

    Beam search, ``length_rule`` (the score that ranks finished captions, ``length_penalty`` 1):

    * ``"official"``: transformers 4.15, which produced BLIP's released captions:
      ``sum log p / len ** length_penalty`` with ``len`` the whole sequence *with* the prompt and
      *without* [SEP]; a caption cut at ``max_length`` is scored over ``max_length`` tokens;
    * ``"transformers"``: transformers 5 (the installed one, what an exported model decodes with):
      ``len`` = the generated tokens *with* [SEP], prompt excluded.

    The rules also differ in their early-stop heuristic (see ``generation._beam_search``).
    """

    method: str = "beam"  # beam (BLIP's default, 3 beams) | nucleus (CapFilt, p=0.9) | greedy
    num_beams: int = 3
    max_length: int = 20  # total tokens including the prompt
    min_length: int = 5
    top_p: float = 0.9
    top_k: int = 50  # nucleus: kept before top-p (transformers' default, as BLIP ran it); 0 = off
    repetition_penalty: float = 1.0  # BLIP hard-codes 1.1 for nucleus sampling
    length_penalty: float = 1.0
    length_rule: str = "transformers"  # beam: official (transformers 4.15, BLIP's captions) | transformers (5)

    def __post_init__(self) -> None:
        if self.method not in GENERATION_METHODS:
            raise ValueError(f"generation method {self.method!r} unknown; use one of {GENERATION_METHODS}")
        if self.method == "beam" and self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns top-k off)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1: none; CTRL's 1.2)")
        if self.length_rule not in LENGTH_RULES:
            raise ValueError(f"length_rule={self.length_rule!r} unknown; use one of {LENGTH_RULES}")

    @classmethod
    def nucleus(cls, **kw) -> "GenerationConfig":
        """CapFilt's synthetic-caption setting as BLIP ran it: top_k 50, then top_p 0.9,
        repetition penalty 1.1 (hard-coded in BLIP's ``generate(sample=True)``)."""
        return cls(method="nucleus", **{"top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, **kw})


def load_preset(name: str, **overrides: Any) -> BlipConfig:
    """Load a size preset and apply overrides.

    Overrides are top-level fields or ``vision``/``text`` dicts merged into the preset, e.g.
    ``load_preset("tiny", text={"vocab_size": 1200}, queue_size=256)``.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {PRESETS}")
    d = json.loads(resources.files("blip.model").joinpath(f"presets/{name}.json").read_text())
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    d["preset"] = name
    return BlipConfig.from_dict(d)
