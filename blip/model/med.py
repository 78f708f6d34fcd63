"""MED text transformer (BLIP's ``med.py``): one BERT-style stack, three roles.

Module names follow ``med.py``/BERT exactly (``embeddings.word_embeddings``,
``encoder.layer.i.attention.self.query``, ``...crossattention...``, ``intermediate.dense``,
``output.LayerNorm``, ``cls.predictions.*``), so ``bert-base-uncased`` and official BLIP weights
load key for key. Attention runs on ``torch.nn.functional.scaled_dot_product_attention``.

The role of a forward pass is explicit (:class:`Role`), and the role decides the token at
position 0, the attention pattern and whether cross-attention runs (§3.1 of the paper):

=================  ==========  ============  ================
role               position 0  self-attn     cross-attention
=================  ==========  ============  ================
``Role.TEXT``      [CLS]       bidirectional  no  (ITC)
``Role.ENCODER``   [ENC]       bidirectional  yes (ITM)
``Role.DECODER``   [DEC]       causal         yes (LM)
=================  ==========  ============  ================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TextConfig


class Role(enum.Enum):
    TEXT = "text"  # unimodal text encoder
    ENCODER = "encoder"  # image-grounded text encoder
    DECODER = "decoder"  # image-grounded text decoder

    @property
    def causal(self) -> bool:
        return self is Role.DECODER

    @property
    def cross_attention(self) -> bool:
        return self is not Role.TEXT

    def first_token(self, cfg: TextConfig) -> int:
        return {Role.TEXT: cfg.cls_token_id, Role.ENCODER: cfg.enc_token_id, Role.DECODER: cfg.bos_token_id}[self]


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Copy of ``input_ids`` with position 0 set to ``token_id`` (the role token)."""
    if bool((input_ids[:, 0] == token_id).all()):
        return input_ids
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


@dataclass
class KVCache:
    """Key/value cache for incremental decoding.

    Self-attention keys/values are preallocated ``(B, heads, max_len, head_dim)`` buffers filled
    in place; cross-attention keys/values are computed once from the image tokens and reused
    for every step (and shared by all beams of an image).
    """

    max_len: int
    length: int = 0
    self_k: list[torch.Tensor] = field(default_factory=list)
    self_v: list[torch.Tensor] = field(default_factory=list)
    cross_k: list[torch.Tensor] = field(default_factory=list)
    cross_v: list[torch.Tensor] = field(default_factory=list)

    def expand(self, repeats: int, max_len: int | None = None) -> "KVCache":
        """Each row repeated ``repeats`` times (beam search: prefill once per image, then fan out)."""
        out = KVCache(max_len=max_len or self.max_len, length=self.length)
        for src, dst in ((self.self_k, out.self_k), (self.self_v, out.self_v)):
            for t in src:
                B, H, _, D = t.shape
                buf = t.new_empty(B * repeats, H, out.max_len, D)
                buf[:, :, : self.length] = t[:, :, : self.length].repeat_interleave(repeats, 0)
                dst.append(buf)
        out.cross_k = [t.repeat_interleave(repeats, 0) for t in self.cross_k]
        out.cross_v = [t.repeat_interleave(repeats, 0) for t in self.cross_v]
        return out

    def select(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (drop finished captions from the batch)."""
        for buf in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            buf[:] = [t.index_select(0, index) for t in buf]

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows (beams) ``index`` of the self-attention cache; cross K/V are per image."""
        n = self.length
        for buf in (self.self_k, self.self_v):
            for t in buf:
                t[:, :, :n] = t[:, :, :n].index_select(0, index)


class TextEmbeddings(nn.Module):
    """Word + position embeddings, LayerNorm, dropout; BLIP has no token-type embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # Non-persistent: official checkpoints carry ``position_ids``; converters drop them.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        T = input_ids.shape[1]
        if past_length + T > self.position_ids.shape[1]:
            raise ValueError(
                f"text of {past_length + T} tokens exceeds max_position_embeddings="
                f"{self.position_ids.shape[1]}; truncate the captions or raise text.max_position_embeddings"
            )
        pos = self.position_ids[:, past_length : past_length + T]
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head attention; for cross-attention, key/value read the image tokens."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"text.hidden_size={cfg.hidden_size} is not a multiple of "
                f"text.num_attention_heads={cfg.num_attention_heads}"
            )
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, nh, T, hs)
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.key(states)), self.split(self.value(states))

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        q = self.split(self.query(x))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0, is_causal=is_causal
        )
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)


class SelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class Attention(nn.Module):
    """``attention`` / ``crossattention`` block: ``self`` (q, k, v) + ``output`` (dense, LN)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = SelfAttention(cfg, kv_width)
        self.output = SelfOutput(cfg)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf GELU, as BERT


class Output(SelfOutput):
    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        if cfg.add_cross_attention:
            self.crossattention = Attention(cfg, encoder_width)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        is_causal: bool,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        idx: int = 0,
        first_only: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``first_only``: keys/values from every token, but queries (and so the output) only at
        position 0 — all the last layer must compute when only [CLS]/[ENC] is read (ITC, ITM)."""
        sa = self.attention.self
        k, v = sa.project_kv(x)
        if cache is not None:  # write this step's keys/values, attend to everything so far
            n, T = cache.length, x.shape[1]
            cache.self_k[idx][:, :, n : n + T] = k
            cache.self_v[idx][:, :, n : n + T] = v
            k, v = cache.self_k[idx][:, :, : n + T], cache.self_v[idx][:, :, : n + T]
        if first_only:
            x = x[:, :1]
            if self_mask is not None:
                self_mask = self_mask[:, :, :1]
        x = self.attention.output(sa(x, k, v, self_mask, is_causal), x)
        if image is not None or (cache is not None and cache.cross_k):
            ca = self.crossattention.self
            if cache is not None and cache.cross_k:
                ck, cv = cache.cross_k[idx], cache.cross_v[idx]
            else:
                ck, cv = ca.project_kv(image)  # once per distinct image ...
                if image_index is not None:  # ... then gathered per text
                    ck, cv = ck.index_select(0, image_index), cv.index_select(0, image_index)
            x = self.crossattention.output(ca(x, ck, cv, image_mask, False), x)
        return self.output(self.intermediate(x), x)


class TextTransformer(nn.Module):
    """The BERT-style stack (``BertModel`` of ``med.py``, without pooler).

    ``forward`` returns the last hidden states ``(B, T, hidden)``. Inputs: ``input_ids`` and
    ``attention_mask`` ``(B, T)`` (1 = token, 0 = padding, right-padded), ``role``, and for the
    image-grounded roles ``image_embeds`` ``(B, N, encoder_width)`` — or ``(M, N, encoder_width)``
    plus ``image_index`` ``(B,)`` naming each text's image, so cross-attention keys/values are
    projected once per distinct image. Position 0 of the ids is overwritten with the role's
    token unless continuing from a cache.
    """

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Layer(cfg, encoder_width) for _ in range(cfg.num_hidden_layers)])
        self.grad_checkpointing = cfg.grad_checkpointing

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        role: Role = Role.TEXT,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        first_only: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``(B, T, hidden)``, or ``(B, 1, hidden)`` at position 0 with ``first_only``
        (bidirectional roles only; the last layer then skips the other positions' queries)."""
        if first_only and role.causal:
            raise ValueError("first_only reads position 0 of a bidirectional role, not the decoder")
        past = cache.length if cache is not None else 0
        if role.cross_attention and image_embeds is None and not (cache is not None and cache.cross_k):
            raise ValueError(f"role {role.name} attends to the image: pass image_embeds")
        if not role.cross_attention and image_embeds is not None:
            raise ValueError("role TEXT is the unimodal encoder: it takes no image_embeds")
        if past == 0:
            input_ids = with_first_token(input_ids, role.first_token(self.cfg))
        x = self.embeddings(input_ids, past)
        self_mask, is_causal = _self_attention_mask(attention_mask, role.causal, past, x)
        cross_mask = None
        if image_mask is not None and not bool(image_mask.all()):
            if image_index is not None:
                image_mask = image_mask.index_select(0, image_index)
            cross_mask = image_mask[:, None, None, :].bool()
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            fo = first_only and i == last
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(
                    layer, x, self_mask, is_causal, image_embeds, cross_mask, None, i, fo, image_index, use_reentrant=False
                )
            else:
                x = layer(x, self_mask, is_causal, image_embeds, cross_mask, cache, i, fo, image_index)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return x


def _self_attention_mask(
    attention_mask: torch.Tensor | None, causal: bool, past: int, x: torch.Tensor
) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask (True = attend) or ``None``, plus SDPA's ``is_causal`` flag.

    Without padding the mask is dropped so SDPA can take its fast paths. With a cache
    (``past > 0``) a given mask must cover all ``past + T`` keys.
    """
    B, T = x.shape[:2]
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if not causal or T == 1:
            return None, False  # one new query may attend to every cached key
        if past == 0:
            return None, True
    S = past + T
    keep = attention_mask.bool() if attention_mask is not None else torch.ones(B, S, dtype=torch.bool, device=x.device)
    if keep.shape[1] != S:
        raise ValueError(f"attention_mask covers {keep.shape[1]} tokens, expected {S} (cached + new)")
    mask = keep[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        tri = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
        mask = mask & tri[None, None]  # (B, 1, T, S)
    return mask, False


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """``cls.predictions``: transform, then ``decoder`` whose bias *is* ``bias`` (as BERT)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)


class TextDecoder(nn.Module):
    """Image-grounded text decoder (``BertLMHeadModel``): ``bert`` + ``cls`` LM head.

    With ``tie_word_embeddings`` the output projection *is* the input word embedding matrix.
    """

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.bert = TextTransformer(cfg, encoder_width)
        self.cls = LMHead(cfg)
        if cfg.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` (``(B, 1, vocab)`` with ``last_only``); [DEC] at position 0."""
        h = self.bert(input_ids, attention_mask, Role.DECODER, image_embeds, image_mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.cls.predictions(h)

    def new_cache(self, image_embeds: torch.Tensor, batch: int, max_len: int) -> KVCache:
        """Empty cache for ``batch`` rows with the image's cross-attention K/V projected once."""
        p = next(self.parameters())
        cache = KVCache(max_len=max_len)
        for layer in self.bert.encoder.layer:
            sa = layer.attention.self
            shape = (batch, sa.heads, max_len, sa.head_dim)
            cache.self_k.append(torch.empty(shape, dtype=p.dtype, device=p.device))
            cache.self_v.append(torch.empty(shape, dtype=p.dtype, device=p.device))
            ck, cv = layer.crossattention.self.project_kv(image_embeds)
            cache.cross_k.append(ck)
            cache.cross_v.append(cv)
        return cache


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
