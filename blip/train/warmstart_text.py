"""Unimodal warm start of the text transformer: the BERT role at the embedded scale.

BLIP's text encoder and decoder both start from BERT-base, trained by masked-language modelling
(MLM) on a large text corpus that is not BLIP's pre-training data. The embedded-scale analogue:

* corpus: captions of the generated world's scenes (``world.SPLIT_IDS["text"]``, own seeds,
  disjoint from every pair split), in the human style or dressed as alt-text (``web_style``) —
  text about the same world, as BERT's Wikipedia covers the words of COCO captions; no images,
  no noise;
* objective: BERT's MLM (15% of the word tokens chosen; of those 80% become ``[MASK]``, 10% a
  random token, 10% stay) with BERT's head (``cls.predictions``, the decoder's LM head in BLIP),
  on the unimodal text role (no cross-attention), AdamW, linear warm-up, cosine decay;
* the last ``held_out`` captions only measure: masked-token accuracy and loss.

The result is the text transformer's state dict (``embeddings.*``, ``encoder.layer.*`` without
cross-attention, ``cls.predictions.*``) plus a JSON card; :func:`load_text_init` copies it, as
BLIP loads ``bert-base-uncased``, into the text encoder, the text decoder (its self-attention
too: BLIP's decoder is a second copy of BERT) and their momentum copies; cross-attention and the
ITC/ITM heads stay random, as in BLIP.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.grammar import describe, web_style
from ..data.text import pre_caption
from ..data.world import TRAIN_BACKGROUNDS, WorldConfig, sample_rngs, sample_scene
from ..dist import train_autocast
from ..model.config import TextConfig
from ..model.med import LMHead, Role, TextTransformer, init_bert_weights
from ..tokenizer import BlipTokenizer
from .config import TextWarmstartConfig
from .optim import param_groups
from .warmstart import card, warm_start_loop

WEIGHTS = "text.safetensors"
CARD = "text.json"
FORMAT = "blip-bootstrap/text-warmstart-v1"
MASK_P, MASK_TOKEN_P, RANDOM_TOKEN_P = 0.15, 0.8, 0.1  # BERT's


def text_corpus(n: int, seed: int, world: WorldConfig, web_p: float = 0.5) -> list[str]:
    """``n`` captions of fresh scenes of ``world`` (split ``text``), cleaned as the loader cleans;
    a ``web_p`` share dressed as alt-text."""
    out = []
    for i in range(n):
        rngs = sample_rngs(seed, "text", i)
        text = describe(sample_scene(rngs[0], world, TRAIN_BACKGROUNDS), rngs[2])
        if rngs[3].random() < web_p:
            text = web_style(text, rngs[3])
        out.append(pre_caption(text, 10_000))
    return out


class MaskedLM(nn.Module):
    """BERT for MLM: the text transformer (unimodal role) + ``cls.predictions``."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.bert = TextTransformer(cfg, encoder_width)
        self.cls = LMHead(cfg)
        init_bert_weights(self)
        if cfg.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(self.bert(ids, mask, Role.TEXT))


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, tok: BlipTokenizer,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of ``ids`` ``(B, T)``: returns (inputs, labels with -100 where not chosen).
    Position 0 ([CLS]) and padding are never chosen; [SEP] is not either."""
    chosen_ok = attention.bool() & (ids != tok.sep_token_id)
    chosen_ok[:, 0] = False
    p = torch.rand(ids.shape, generator=gen)
    chosen = (p < MASK_P) & chosen_ok
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (r < MASK_TOKEN_P)] = tok.hf.mask_token_id
    randomise = chosen & (r >= MASK_TOKEN_P) & (r < MASK_TOKEN_P + RANDOM_TOKEN_P)
    inputs[randomise] = torch.randint(len(tok), ids.shape, generator=gen)[randomise]
    return inputs, labels


@torch.no_grad()
def held_out_metrics(model: MaskedLM, ids, attention, tok, device, seed: int, batch_size: int = 256) -> dict:
    """Masked-token loss and accuracy on the held-out captions (a fixed masking, ``seed``)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    loss_sum, right, n = 0.0, 0, 0
    for i in range(0, len(ids), batch_size):
        x, labels = mask_tokens(ids[i:i + batch_size], attention[i:i + batch_size], tok, gen)
        logits = model(x.to(device), attention[i:i + batch_size].to(device)).float().cpu()
        keep = labels != -100
        loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        right += int((logits[keep].argmax(-1) == labels[keep]).sum())
        n += int(keep.sum())
    model.train()
    return {"mlm_loss": round(loss_sum / max(n, 1), 4), "mlm_accuracy": round(right / max(n, 1), 4),
            "masked_tokens": n}


def train_text(cfg: TextWarmstartConfig, text: TextConfig, encoder_width: int, world: WorldConfig,
               tokenizer: BlipTokenizer, out_dir: str | Path, tracker=None) -> dict[str, Any]:
    """MLM-train ``text``'s transformer on the world's caption corpus; write ``text.safetensors``
    + ``text.json``."""
    from .. import dist
    from ..track import NullTracker

    tracker = tracker or NullTracker()
    if tokenizer.hf.mask_token_id is None:
        raise ValueError("the tokenizer has no [MASK] token: MLM needs one (build the vocabulary with blip.tokenizer)")
    if text.vocab_size != len(tokenizer):
        raise ValueError(f"model text.vocab_size={text.vocab_size} but the tokenizer has {len(tokenizer)} tokens")
    device = dist.resolve_device(cfg.device)
    t0 = time.perf_counter()
    corpus = text_corpus(cfg.captions, cfg.seed, world)
    batch = tokenizer(corpus, max_length=cfg.max_text_len, padding="max_length")
    ids, attention = batch.input_ids, batch.attention_mask
    gen_s = time.perf_counter() - t0
    n_train = cfg.captions - cfg.held_out
    torch.manual_seed(cfg.seed)
    model = MaskedLM(text, encoder_width).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    bf16 = dist.bf16_enabled(cfg.bf16, device)

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        length = int(attention[idx].sum(1).max())  # trim the batch's common padding
        x, labels = mask_tokens(ids[idx, :length], attention[idx, :length], tokenizer, gen)
        with train_autocast(device, bf16):
            logits = model(x.to(device), attention[idx, :length].to(device))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)

    run = warm_start_loop("warmstart_text", "mlm", cfg, opt, n_train, loss_of, tracker)
    step, first, loss_ema, train_s = run["steps"], run["first"], run["final"], run["seconds"]
    metrics = held_out_metrics(model, ids[n_train:], attention[n_train:], tokenizer, device, cfg.seed + 1)
    summary = {"format": FORMAT, "text": asdict(text), "encoder_width": encoder_width, "world": asdict(world),
               "warmstart": asdict(cfg), "steps": step, "first_mlm": round(first or float("nan"), 5),
               "final_mlm": round(loss_ema or float("nan"), 5),
               "captions_per_s": round(step * cfg.batch_size / train_s, 1) if train_s else None,
               "corpus_seconds": round(gen_s, 2), "train_seconds": round(train_s, 2), "bf16": bf16,
               "held_out": metrics, "example": corpus[0]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if ".crossattention." not in k and k != "cls.predictions.decoder.bias"}  # the bias is `bias`
    if text.tie_word_embeddings:
        state.pop("cls.predictions.decoder.weight", None)  # = the word embeddings
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CARD).write_text(json.dumps(card(summary), indent=2))
    tracker.log_metrics({f"held_out/{k}": v for k, v in metrics.items()}, step=step)
    return summary


def load_text_init(model, directory: str | Path) -> dict[str, Any]:
    """Copy a warm-start text transformer (``directory`` from :func:`train_text`) into every text
    tower of ``model`` — ``text_encoder``, ``text_decoder.bert`` + ``text_decoder.cls`` and
    their momentum copies, where the model has them — as BLIP loads BERT into both. Raises
    naming the file when the shapes differ (the warm start was made for another ``model.text``
    or tokenizer)."""
    directory = Path(directory)
    card_path, weights = directory / CARD, directory / WEIGHTS
    for p in (card_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no text warm start here; run the warmstart_text stage "
                                    "(`dvc repro warmstart_text`) or set warmstart_text.enabled: false")
    card = json.loads(card_path.read_text())
    state = load_file(str(weights))
    bert = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    head = {k[len("cls."):]: v for k, v in state.items() if k.startswith("cls.")}
    targets = [(getattr(model, n), bert) for n in ("text_encoder", "text_encoder_m") if hasattr(model, n)]
    for n in ("text_decoder", "text_decoder_m"):
        if hasattr(model, n):
            targets += [(getattr(model, n).bert, bert), (getattr(model, n).cls, head)]
    with torch.no_grad():
        for module, sub in targets:
            own = module.state_dict()
            missing = [k for k in own if k not in sub and ".crossattention." not in k
                       and k not in ("predictions.decoder.weight", "predictions.decoder.bias")]
            if missing:
                raise ValueError(f"{weights}: the warm-start text transformer lacks {missing[:3]}; "
                                 "re-run warmstart_text after changing model.text or the tokenizer")
            for k, v in sub.items():
                if k not in own or own[k].shape != v.shape:
                    raise ValueError(f"{weights}: {k} {tuple(v.shape)} does not fit this model "
                                     f"({tuple(own[k].shape) if k in own else 'absent'}); re-run warmstart_text "
                                     "after changing model.text or the tokenizer")
                own[k].copy_(v)  # state_dict tensors share storage with the parameters (tied ones too)
    return card

