"""Weight converters: official BLIP ``.pth`` → ours; ours ↔ transformers' BLIP classes.

* Official → ours: the key names are already ours; drop ``*.position_ids``, interpolate
  ``pos_embed`` to the target image size, keep only the towers the target model has.
* Ours ↔ transformers: the vision keys follow the ten rename rules of
  ``convert_blip_original_pytorch_to_hf.py`` (blip-facts §3.3); text keys are unchanged.
  ``BlipForConditionalGeneration`` ↔ :class:`BlipCaptioner` (or the decoder of a pre-trained
  model), ``BlipForImageTextRetrieval`` ↔ :class:`BlipRetrieval`.

Traps handled here (blip-facts §3.4): transformers' text heads default to 8 and vision
LayerNorm eps to 1e-5, and its LM label smoothing defaults to 0 — the generated configs set all
three from ours.

A transformers export (:func:`save_hf`) also carries the processor — the image processor doing
our eval transform and the tokenizer — so ``AutoProcessor`` and ``pipeline`` load it as is.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from .checkpoint import load_weights
from .data.transforms import CLIP_MEAN, CLIP_STD
from .model.blip import BlipBase, BlipCaptioner, BlipRetrieval
from .model.config import BlipConfig, GenerationConfig, TextConfig, VisionConfig

# ours (official) -> transformers, applied in order to keys under "visual_encoder."
_VISION_RULES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
]
_HF_RULES = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
]
# Keys transformers' inference classes do not have (blip-facts §3.3).
_TRAINING_ONLY = re.compile(r"(^|\.)(\w+_m)\.|^(image_queue|text_queue|idx_queue|queue_ptr|ptr_queue|temp)$")


def _rename(key: str, rules) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our/official keys → transformers keys; training-only tensors (momentum, queues) dropped."""
    return {_rename(k, _VISION_RULES): v for k, v in state.items() if not _TRAINING_ONLY.search(k)}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_rename(k, _HF_RULES): v for k, v in state.items() if not k.endswith("position_ids")}


def hf_config(cfg: BlipConfig):
    """A ``transformers.BlipConfig`` equivalent to ours (heads, eps, smoothing set explicitly)."""
    from transformers import BlipConfig as HFBlipConfig
    from transformers import BlipTextConfig, BlipVisionConfig

    t, v = cfg.text, cfg.vision
    text = BlipTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=v.width,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.hidden_dropout_prob,
        attention_probs_dropout_prob=t.attention_probs_dropout_prob, pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id, sep_token_id=t.sep_token_id, eos_token_id=t.sep_token_id,
        label_smoothing=cfg.label_smoothing, tie_word_embeddings=t.tie_word_embeddings,
        cls_token_id=t.cls_token_id, enc_token_id=t.enc_token_id,  # kept as extra attributes
    )
    vision = BlipVisionConfig(
        hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
    )
    return HFBlipConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=cfg.embed_dim,
        label_smoothing=cfg.label_smoothing,
    )


def config_from_hf(hf_cfg) -> BlipConfig:
    """Our config from a ``transformers.BlipConfig``."""
    t, v = hf_cfg.text_config, hf_cfg.vision_config
    mlp = v.intermediate_size / v.hidden_size
    return BlipConfig(
        vision=VisionConfig(
            image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size, depth=v.num_hidden_layers,
            heads=v.num_attention_heads, mlp_ratio=mlp, layer_norm_eps=v.layer_norm_eps,
        ),
        text=TextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
            hidden_dropout_prob=t.hidden_dropout_prob, attention_probs_dropout_prob=t.attention_probs_dropout_prob,
            pad_token_id=t.pad_token_id, sep_token_id=t.sep_token_id,
            cls_token_id=getattr(t, "cls_token_id", None) or 101, bos_token_id=t.bos_token_id,
            enc_token_id=getattr(t, "enc_token_id", None) or t.bos_token_id + 1,  # BLIP adds [ENC] after [DEC]
        ),
        embed_dim=getattr(hf_cfg, "image_text_hidden_size", 256),
        # transformers defaults label_smoothing to 0 (a parity trap); BLIP trains with 0.1.
        label_smoothing=0.1,
    )


def _load_into_hf(hf_model, state: dict[str, torch.Tensor]):
    own = hf_model.state_dict()
    sd = {k: v for k, v in to_hf_state_dict(state).items() if k in own}
    missing = sorted(set(own) - set(sd) - {k for k in own if k.endswith("position_ids")})
    if missing:
        raise KeyError(f"transformers model keys without a source tensor: {missing[:8]}")
    hf_model.load_state_dict(sd, strict=False)
    return hf_model.eval()


def to_hf_captioner(model: BlipBase):
    """``transformers.BlipForConditionalGeneration`` with our ViT and text decoder."""
    from transformers import BlipForConditionalGeneration

    return _load_into_hf(BlipForConditionalGeneration(hf_config(model.cfg)), model.state_dict())


def to_hf_retrieval(model: BlipBase):
    """``transformers.BlipForImageTextRetrieval`` with our ViT, text encoder, projections, ITM head."""
    from transformers import BlipForImageTextRetrieval

    return _load_into_hf(BlipForImageTextRetrieval(hf_config(model.cfg)), model.state_dict())


def _from_hf(hf_model, cls):
    cfg = config_from_hf(hf_model.config)
    model = cls(cfg)
    state = from_hf_state_dict(hf_model.state_dict())
    report = load_weights(model, state, strict=False)
    # Tensors transformers never had (momentum encoders, queues, temp) keep their fresh init;
    # momentum encoders restart as copies of the loaded towers.
    if hasattr(model, "_build_momentum"):
        for name, name_m in model.momentum_pairs:
            getattr(model, name_m).load_state_dict(getattr(model, name).state_dict())
    bad = [k for k in report["missing"] if not _TRAINING_ONLY.search(k)]
    if bad:
        raise KeyError(f"transformers checkpoint lacks {bad[:8]}")
    return model.eval()


def from_hf_captioner(hf_model) -> BlipCaptioner:
    return _from_hf(hf_model, BlipCaptioner)


def from_hf_retrieval(hf_model) -> BlipRetrieval:
    return _from_hf(hf_model, BlipRetrieval)


def hf_image_processor(cfg: BlipConfig):
    """transformers' BLIP image processor doing our eval transform (``data.transforms.EvalTransform``
    then ``normalize``): RGB (alpha on white), resize to (image_size, image_size) without crop,
    PIL bicubic, /255, CLIP mean/std.

    Built on the PIL backend, whose resize is PIL's own and so bit-exact with ours. The saved file
    does not record a backend: ``AutoProcessor``/``AutoImageProcessor`` pick torchvision when it is
    installed, whose uint8 bicubic rounds differently — at most one grey level, i.e.
    ``1 / 255 / min(std)`` ≈ 0.015 after normalisation. ``backend="pil"`` at load time is exact.
    """
    from transformers import BlipImageProcessorPil
    from transformers.image_utils import PILImageResampling

    s = cfg.vision.image_size
    return BlipImageProcessorPil(
        do_resize=True, size={"height": s, "width": s}, resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def hf_tokenizer(tokenizer, model_max_length: int | None = None):
    """Our tokenizer as transformers' ``BertTokenizer`` (its fast tokenizer; ``BertTokenizerFast`` is
    the same class in transformers 5), with BLIP's specials: [PAD] [UNK] [CLS] [SEP] [MASK],
    bos = [DEC] (the id BLIP's ``generate`` writes at position 0) and [ENC] as an extra special.

    ``BertTokenizer`` rebuilds the normaliser, pre-tokeniser and [CLS] $A [SEP] template from the
    vocabulary, so it is checked against ours on every vocabulary word and the prompt; a tokenizer
    it cannot reproduce (e.g. cased) is exported as is (``tokenizer_class`` TokenizersBackend).
    """
    from transformers import BertTokenizer

    vocab = dict(tokenizer.hf.get_vocab())
    bert = BertTokenizer(
        vocab=vocab, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]" if "[MASK]" in vocab else None, bos_token="[DEC]",
        extra_special_tokens=["[ENC]"],
    )
    words = [w for w in sorted(vocab, key=vocab.get) if not (w.startswith("[") and w.endswith("]"))]
    probes = ["a picture of ", " ".join(words), "A Picture of DOGS, café! 日本", "[DEC] [ENC] x"]
    same = all(bert(t)["input_ids"] == tokenizer.hf(t)["input_ids"] for t in probes) and all(
        getattr(bert, f"{n}_token_id") == getattr(tokenizer, f"{n}_token_id") for n in ("pad", "cls", "sep", "bos")
    )
    out = bert if same else copy.deepcopy(tokenizer.hf)
    if model_max_length is not None:
        out.model_max_length = model_max_length  # longer inputs would overrun the position embeddings
    return out


def hf_generation_config(cfg: BlipConfig, gen: GenerationConfig | None = None):
    """transformers ``GenerationConfig`` for our captioning defaults (beam 3, max 20, min 5; the
    lengths count the prompt, as BLIP's and transformers' do)."""
    from transformers import GenerationConfig as HFGenerationConfig

    gen = gen or GenerationConfig()
    t = cfg.text
    return HFGenerationConfig(
        do_sample=gen.method == "nucleus", top_p=gen.top_p if gen.method == "nucleus" else None,
        top_k=gen.top_k if gen.method == "nucleus" else None,
        num_beams=gen.num_beams if gen.method == "beam" else 1, max_length=gen.max_length,
        min_length=gen.min_length, repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
        bos_token_id=t.bos_token_id, eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id,
    )


def save_hf(model: BlipBase, directory: str | Path, kind: str = "captioner", tokenizer=None) -> Path:
    """Save a transformers-format model (``save_pretrained``) usable with ``transformers`` directly.

    Writes ``config.json`` + ``model.safetensors`` and the image processor (our eval transform,
    :func:`hf_image_processor`); with ``tokenizer`` the two as one ``BlipProcessor``
    (``processor_config.json`` + tokenizer files, :func:`hf_tokenizer`), so that
    ``AutoProcessor.from_pretrained(directory)`` and ``pipeline`` load it as is. ``kind="captioner"``
    also writes ``generation_config.json``: our defaults (beam search, 3 beams, lengths 5..20).

    Captioning with the text of :meth:`BlipCaptioner.caption` (its default beam search)::

        from transformers import AutoProcessor, pipeline
        pipe = pipeline("image-text-to-text", model=directory,
                        processor=AutoProcessor.from_pretrained(directory, backend="pil"),
                        num_beams=3, max_length=20, min_length=5)  # = generation_config.json
        pipe(images=image, text="a picture of ", return_full_text=False)[0]["generated_text"].strip()
        # greedy: pipe(..., generate_kwargs={"num_beams": 1})

    Why each argument (transformers 5 behaviours): BLIP's ``generate`` hands everything to its text
    decoder, whose own generation config never sees ``generation_config.json`` — a bare pipeline
    decodes greedily, 20 new tokens, no minimum length (``generation_config=GenerationConfig.
    from_pretrained(directory)`` also works, with a deprecation warning). The pipeline requires
    ``text``: the prompt, tokenised [CLS] a picture of [SEP], of which BLIP's ``generate`` turns
    [CLS] into [DEC] and drops [SEP]. ``backend="pil"`` makes the pixels bit-exact with our eval
    transform (the default torchvision backend is within one grey level). ``return_full_text=False``
    drops the prompt (the full text has it twice-spaced: "a picture of  dog"). Transformers 5 has
    no ``"image-to-text"`` pipeline any more: the name warns and builds this one (``text`` needed).

    Retrieval: transformers' ``BlipForImageTextRetrieval`` feeds ``input_ids`` as given; for ITM put
    [ENC] (``processor.tokenizer.convert_tokens_to_ids("[ENC]")``) at position 0 as BLIP does; ITC
    (``use_itm_head=False``) takes the processor's [CLS] ids as they are.
    """
    converters = {"captioner": to_hf_captioner, "retrieval": to_hf_retrieval}
    if kind not in converters:
        raise ValueError(f"kind={kind!r}: use one of {sorted(converters)}")
    if tokenizer is not None and len(tokenizer) > model.cfg.text.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's text.vocab_size is {model.cfg.text.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    hf = converters[kind](model)
    if kind == "captioner":
        hf.generation_config = hf_generation_config(model.cfg)
    hf.save_pretrained(str(directory))
    image_processor = hf_image_processor(model.cfg)
    if tokenizer is None:  # no tokenizer to pair it with: AutoImageProcessor loads, AutoProcessor cannot
        image_processor.save_pretrained(str(directory))
        return Path(directory)
    from transformers import BlipProcessor

    text = hf_tokenizer(tokenizer, model_max_length=model.cfg.text.max_position_embeddings)
    BlipProcessor(image_processor=image_processor, tokenizer=text).save_pretrained(str(directory))
    return Path(directory)


def from_official(state: dict[str, torch.Tensor], model: BlipBase) -> dict[str, list[str]]:
    """Load an official BLIP state dict (``torch.load(path)["model"]``) into ``model``.

    Drops ``*.position_ids``, interpolates ``pos_embed`` to the model's image size, ignores towers
    the model lacks, and returns the load report (missing/unexpected keys).
    """
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    report = load_weights(model, {k: v for k, v in state.items() if k in own}, strict=False)
    report["unexpected"] = sorted(unexpected)
    return report


def load_official_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official ``.pth`` with the weights-only unpickler (no code from the file runs)."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
