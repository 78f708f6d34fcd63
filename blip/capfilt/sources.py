"""Where a captioner or a filter comes from: ours, an official BLIP ``.pth``, or a transformers folder.

Bring-your-own-data CapFilt runs with released checkpoints — the maintainers' answer to "where are
the captioner and the filter?" is the COCO-finetuned captioning checkpoint and the COCO-finetuned
retrieval checkpoint (blip-facts §1.17). :func:`load_source` accepts, for either role:

* **ours**: a folder written by ``blip.checkpoint.save_model`` (``config.json`` with our format,
  ``model.safetensors``, ``tokenizer/``);
* **official**: a ``.pth`` file of salesforce/BLIP (captioning: ``model_base_caption_capfilt_large.pth``,
  ``model_large_caption.pth``; retrieval: ``model_base_retrieval_coco.pth``,
  ``model_large_retrieval_coco.pth``), read with the weights-only unpickler. Its shapes give the
  config (ViT width/depth/patch/image size, BERT width/depth, projection size, queue); the file
  has no vocabulary, so ``vocab_file`` (bert-base-uncased's ``vocab.txt``) is required;
* **transformers**: a folder with a ``BlipForConditionalGeneration`` (captioner) or
  ``BlipForImageTextRetrieval`` (filter) ``config.json`` + weights, as published for
  ``Salesforce/blip-image-captioning-*`` and ``Salesforce/blip-itm-*-coco``; its tokenizer is the
  folder's ``vocab.txt`` (BLIP's [DEC] and [ENC] appended as ``init_tokenizer`` does), else its
  ``tokenizer.json``, else ``vocab_file``.

Nothing is downloaded: a name that is not a local path is an error that says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.blip import BlipBase
from ..tokenizer import BlipTokenizer

ROLES = {"captioner": "BlipCaptioner", "filter": "BlipRetrieval"}
#: our saved classes each role accepts, and the class each is loaded as (a pre-trained model as a
#: captioner keeps its ITC/ITM towers on disk; as the filter, Table 4's shared setting)
CAPTIONER_ARCHS = {"BlipCaptioner": "BlipCaptioner", "BlipPretrain": "BlipCaptioner"}
FILTER_ARCHS = {"BlipRetrieval": "BlipRetrieval", "BlipPretrain": "BlipPretrain"}
HF_CLASSES = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}
#: the towers each role needs from an official file (a captioning file has no ITM head, and so on)
NEEDS = {"captioner": ("visual_encoder.", "text_decoder."),
         "filter": ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")}


@dataclass
class Source:
    model: BlipBase
    tokenizer: BlipTokenizer
    kind: str  # ours | official | transformers
    path: Path


def kind_of(path: str | Path) -> str:
    """``ours``, ``official`` or ``transformers`` for a checkpoint path; raises naming what it found."""
    p = Path(path)
    if not p.exists():
        hint = " (a hub name? nothing is downloaded: pass a local copy)" if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) \
            else ""
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    if p.is_file():
        if p.suffix in (".pth", ".pt", ".bin"):
            return "official"
        raise ValueError(f"{p}: a checkpoint file must be an official BLIP .pth; folders hold ours or transformers'")
    config = p / "config.json"
    if config.is_file():
        meta = json.loads(config.read_text())
        if "format" in meta and "arch" in meta:
            return "ours"
        if meta.get("model_type") == "blip":
            return "transformers"
    raise ValueError(f"{p}: neither our checkpoint (config.json with format/arch) nor a transformers BLIP folder "
                     "(config.json with model_type 'blip')")


def load_source(path: str | Path, role: str, vocab_file: str | Path | None = None) -> Source:
    """The ``role`` model (``captioner`` | ``filter``) and its tokenizer from ``path``, on the CPU, in
    eval mode."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: captioner | filter")
    kind = kind_of(path)
    path = Path(path)
    if kind == "ours":
        from ..checkpoint import load_model, read_config

        archs = CAPTIONER_ARCHS if role == "captioner" else FILTER_ARCHS
        saved, _ = read_config(path)
        if saved not in archs:
            need = "text decoder" if role == "captioner" else "ITC/ITM heads"
            raise ValueError(f"{path} holds a {saved}, which has no {need}; the {role} must be one of {sorted(archs)} "
                             f"(fine-tune it with the finetune_{'captioner' if role == 'captioner' else 'filter'} job)")
        if not (path / "tokenizer" / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path} has no tokenizer/ folder; save the model with "
                                    "blip.checkpoint.save_model(model, dir, tokenizer=tok)")
        return Source(load_model(path, arch=archs[saved]).eval(), BlipTokenizer.load(path / "tokenizer"), kind, path)
    if kind == "official":
        return _official(path, role, vocab_file)
    return _transformers(path, role, vocab_file)


def _vocab(vocab_file, why: str) -> BlipTokenizer:
    from ..tokenizer import load_vocab

    if vocab_file is None:
        raise ValueError(f"{why}: set model.vocab_file to bert-base-uncased's vocab.txt (BLIP's vocabulary)")
    return load_vocab(vocab_file)


def config_from_official(state: dict[str, torch.Tensor], tok: BlipTokenizer):
    """Our ``BlipConfig`` from an official state dict's shapes (+ the tokenizer's special ids)."""
    from ..model.config import BlipConfig, TextConfig, VisionConfig

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    pos, patch = state["visual_encoder.pos_embed"], state["visual_encoder.patch_embed.proj.weight"]
    width, p = pos.shape[-1], patch.shape[-1]
    side = round((pos.shape[1] - 1) ** 0.5)
    text = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
    words = state[f"{text}embeddings.word_embeddings.weight"]
    hidden = words.shape[1]
    vision = VisionConfig(image_size=side * p, patch_size=p, width=width, depth=count("visual_encoder.blocks."),
                          heads=width // 64,
                          mlp_ratio=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width)
    ids = {k: v for k, v in tok.special_ids.items() if k != "vocab_size"}
    text_cfg = TextConfig(vocab_size=words.shape[0], hidden_size=hidden, num_hidden_layers=count(f"{text}encoder.layer."),
                          num_attention_heads=hidden // 64,
                          intermediate_size=state[f"{text}encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=state[f"{text}embeddings.position_embeddings.weight"].shape[0],
                          **ids)
    embed = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    queue = state["image_queue"].shape[1] if "image_queue" in state else 57600
    return BlipConfig(vision=vision, text=text_cfg, embed_dim=embed, queue_size=queue)


def _official(path: Path, role: str, vocab_file) -> Source:
    from ..checkpoint import MODEL_CLASSES
    from ..convert import from_official, load_official_file

    tok = _vocab(vocab_file, f"{path} is an official BLIP file and carries no vocabulary")
    try:
        state = load_official_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign pickle: say which file
        raise ValueError(f"{path}: not a readable BLIP checkpoint ({type(e).__name__}: {e})") from e
    lacking = [t for t in NEEDS[role] if not any(k.startswith(t) for k in state)]
    if lacking:
        other = "a captioning" if role == "filter" else "a retrieval"
        raise ValueError(f"{path} has no {', '.join(t.rstrip('.') for t in lacking)} weights: the {role} needs them "
                         f"(is it {other} checkpoint? captioner: *_caption*.pth, filter: *_retrieval_*.pth)")
    cfg = config_from_official(state, tok)
    if cfg.text.vocab_size != len(tok):
        raise ValueError(f"{path} has a {cfg.text.vocab_size}-token vocabulary but {vocab_file} gives {len(tok)} "
                         "tokens (with [DEC] and [ENC]); use the vocab.txt the model was trained with")
    model = MODEL_CLASSES[ROLES[role]](cfg)
    report = from_official(state, model)
    missing = [k for k in report["missing"] if not re.search(r"(_m\.|_queue|queue_ptr|^temp$|idx_queue)", k)]
    if missing:
        raise ValueError(f"{path}: the {role} lacks {missing[:6]} in this file")
    if hasattr(model, "momentum_pairs"):
        for name, name_m in model.momentum_pairs:
            getattr(model, name_m).load_state_dict(getattr(model, name).state_dict())
    return Source(model.eval(), tok, "official", path)


def _transformers(path: Path, role: str, vocab_file) -> Source:
    import transformers

    from ..convert import from_hf_captioner, from_hf_retrieval

    meta = json.loads((path / "config.json").read_text())
    want = HF_CLASSES[role]
    if want not in (meta.get("architectures") or [want]):
        raise ValueError(f"{path} holds {meta.get('architectures')}; the {role} must be a {want} "
                         "(captioner: blip-image-captioning-*, filter: blip-itm-*-coco)")
    hf = getattr(transformers, want).from_pretrained(str(path), local_files_only=True)
    model = (from_hf_captioner if role == "captioner" else from_hf_retrieval)(hf)
    if (path / "vocab.txt").is_file():
        from ..tokenizer import load_vocab

        tok = load_vocab(path / "vocab.txt")
    elif (path / "tokenizer.json").is_file():
        tok = BlipTokenizer.load(path)
    else:
        tok = _vocab(vocab_file, f"{path} has no vocab.txt or tokenizer.json")
    if len(tok) > model.cfg.text.vocab_size:
        raise ValueError(f"{path}: its tokenizer has {len(tok)} tokens, more than the model's "
                         f"{model.cfg.text.vocab_size}")
    return Source(model, tok, "transformers", path)
