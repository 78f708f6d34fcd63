"""BLIP models: pre-training (ITC + ITM + LM), retrieval/filter (ITC + ITM), captioner (LM).

Attribute names are the official ones (``visual_encoder``, ``text_encoder``, ``text_decoder``,
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, ``*_m``, ``image_queue``,
``text_queue``, ``queue_ptr`` / ``idx_queue`` + ``ptr_queue``), so ``state_dict()`` keys are
official BLIP checkpoint keys.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from . import losses
from .config import ITM_NEGATIVES, BlipConfig, GenerationConfig
from .embed_cache import ImageEmbedCache
from .generation import generate
from .med import Role, TextDecoder, TextTransformer, init_bert_weights
from .sharing import tie_text_towers
from .vit import VisionEncoder


class BlipBase(nn.Module):
    """Pieces every BLIP model has: the ViT and the image/text feature helpers."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionEncoder(cfg.vision)

    # -- encoders --------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` → image tokens ``(B, 1 + N, D_v)``."""
        if self.vision_frozen:
            with torch.no_grad():
                cache = getattr(self, "_image_cache", None)
                return self.visual_encoder(image) if cache is None else cache(image, self.visual_encoder)
        return self.visual_encoder(image)

    def cache_image_embeds(self, max_bytes: int) -> ImageEmbedCache:
        """Memoise the frozen ViT's tokens by image content from now on (:mod:`.embed_cache`):
        for training on a deterministic transform, where every epoch shows the ViT the same pixels."""
        if not self.vision_frozen:
            raise ValueError("cache_image_embeds: the ViT trains (freeze_vision first); its tokens change every step")
        if self.cfg.vision.drop_path_rate > 0:
            raise ValueError(f"cache_image_embeds: the ViT's drop_path_rate={self.cfg.vision.drop_path_rate} makes its "
                             "training-mode tokens random; set it to 0 or do not cache")
        self._image_cache = ImageEmbedCache(max_bytes)
        return self._image_cache

    @property
    def vision_frozen(self) -> bool:
        return getattr(self, "_vision_frozen", False)

    def freeze_vision(self) -> None:
        """Train everything but the ViT (LiT's locked image tower): it keeps what its warm start
        sees, and neither its backward pass nor its momentum copy costs anything."""
        for p in self.visual_encoder.parameters():
            p.requires_grad_(False)
        self._vision_frozen = True

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features ``(B, E)`` from the class token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text features ``(B, E)`` from the unimodal encoder's [CLS]."""
        h = self.text_encoder(input_ids, attention_mask, Role.TEXT, first_only=True)
        return F.normalize(self.text_proj(h[:, 0]).float(), dim=-1)

    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits ``(B, 2)`` (column 1 = match) of the image-grounded encoder's [ENC].

        ``image_index`` ``(B,)``: row of ``image_embeds`` for each text (default: row i)."""
        h = self.text_encoder(
            input_ids, attention_mask, Role.ENCODER, image_embeds, first_only=True, image_index=image_index
        )
        return self.itm_head(h[:, 0])

    # -- housekeeping ----------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: biases, norms, embeddings-like tokens, temp."""
        names = set()
        for n, p in self.named_parameters():
            if p.ndim <= 1 or n.endswith(".bias") or n.endswith("cls_token") or n.endswith("pos_embed"):
                names.add(n)
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        for m in self.modules():
            if isinstance(m, TextTransformer):
                m.set_grad_checkpointing(enable)

    def _init_text_weights(self) -> None:
        for name in ("text_encoder", "text_decoder", "text_proj", "itm_head"):
            if hasattr(self, name):
                init_bert_weights(getattr(self, name))
        if hasattr(self, "vision_proj"):
            init_bert_weights(self.vision_proj)


class CaptionMixin:
    """``generate`` for every model with a ``text_decoder`` (captioner, pre-trained model)."""

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt_ids: list[int],
        cfg: GenerationConfig | None = None,
        seeds: list[int] | None = None,
        generator: torch.Generator | None = None,
        image_embeds: torch.Tensor | None = None,
        repeats: int = 1,
    ) -> torch.Tensor:
        """Caption ids ``(B * repeats, L)`` starting with the prompt; see :func:`generation.generate`."""
        t = self.cfg.text
        if image_embeds is None:
            image_embeds = self.encode_image(image)
        return generate(
            self.text_decoder, image_embeds, prompt_ids, cfg or GenerationConfig(), t.sep_token_id, t.pad_token_id,
            seeds=seeds, generator=generator, repeats=repeats,
        )


    @torch.no_grad()
    def caption(
        self,
        image: torch.Tensor,
        tokenizer,
        cfg: GenerationConfig | None = None,
        seeds: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Captions as strings, the prompt ("a picture of ") stripped, as BLIP's ``generate``."""
        prompt = tokenizer.prompt_ids(self.cfg.prompt)
        ids = self.generate(image, prompt, cfg, seeds=seeds, generator=generator)
        return tokenizer.batch_decode(ids[:, len(prompt) :])


class MomentumITC(BlipBase):
    """ITC with momentum encoders, feature queues and momentum distillation (ALBEF/BLIP §3.2)."""

    #: name of the queue pointer buffer (``queue_ptr`` in pre-training, ``ptr_queue`` in retrieval)
    ptr_name = "queue_ptr"
    momentum_pairs = (
        ("visual_encoder", "visual_encoder_m"),
        ("vision_proj", "vision_proj_m"),
        ("text_encoder", "text_encoder_m"),
        ("text_proj", "text_proj_m"),
    )

    def _build_itc(self, cfg: BlipConfig, with_idx: bool) -> None:
        t = cfg.text
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(t.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(t.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        self.register_buffer(self.ptr_name, torch.zeros(1, dtype=torch.long))

    def freeze_vision(self) -> None:
        """As :meth:`BlipBase.freeze_vision`; the momentum ViT becomes an exact copy of the frozen
        one, so its features are the ViT's own and are not computed twice."""
        super().freeze_vision()
        self.visual_encoder_m.load_state_dict(self.visual_encoder.state_dict())
        self._pairs = None

    def _build_momentum(self) -> None:
        """Momentum copies start as exact copies and never receive gradients (``copy_params``)."""
        for name, name_m in self.momentum_pairs:
            m = copy.deepcopy(getattr(self, name))
            for p in m.parameters():
                p.requires_grad_(False)
            setattr(self, name_m, m)
        self._pairs = None

    def _momentum_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if getattr(self, "_pairs", None) is None:
            src, dst = [], []
            for name, name_m in self.momentum_pairs:
                if self.vision_frozen and name == "visual_encoder":
                    continue  # a frozen ViT's momentum copy is the ViT
                a, b = dict(getattr(self, name).named_parameters()), dict(getattr(self, name_m).named_parameters())
                assert a.keys() == b.keys(), f"{name} and {name_m} differ in structure"
                src += [a[k] for k in a]
                dst += [b[k] for k in a]
            self._pairs = (src, dst)
        return self._pairs

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m = m * p_m + (1 - m) * p`` for every momentum parameter, fused."""
        src, dst = self._momentum_params()
        torch._foreach_lerp_(dst, [p.detach() for p in src], 1.0 - self.cfg.momentum)

    @torch.no_grad()
    def momentum_features(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ):
        """Momentum ITC features; a frozen ViT's ``image_embeds`` stand for the momentum ViT's."""
        if self.vision_frozen and image_embeds is not None:
            image_embeds_m = image_embeds.detach()
        else:
            image_embeds_m = self.visual_encoder_m(image)
        image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]).float(), dim=-1)
        h = self.text_encoder_m(input_ids, attention_mask, Role.TEXT, first_only=True)
        text_feat_m = F.normalize(self.text_proj_m(h[:, 0]).float(), dim=-1)
        return image_feat_m, text_feat_m

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[1]

    #: where ITM's negative *texts* come from (``config.ITM_NEGATIVES_FROM``): ``batch`` (BLIP's) or
    #: ``queue``, the batch plus the texts behind the ITC queue (their token ids are kept beside the
    #: queue's features, outside the checkpoint: a resumed run refills them). A training choice the
    #: trainer sets from its section of params.yaml, as ``itm_negatives``.
    itm_negatives_from: str = "batch"

    def _text_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` ``(Q, L)``: the texts behind ``text_queue``'s columns; a column never
        written has an all-zero mask. ``L`` grows to the widest batch seen."""
        if getattr(self, "_pool_ids", None) is None:
            dev = self.text_queue.device
            self._pool_ids = torch.zeros(self.queue_size, 1, dtype=torch.long, device=dev)
            self._pool_mask = torch.zeros(self.queue_size, 1, dtype=torch.long, device=dev)
        return self._pool_ids, self._pool_mask

    def _pool_write(self, cols: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        pool_ids, pool_mask = self._text_pool()
        width = max(pool_ids.shape[1], ids.shape[1])
        self._pool_ids, self._pool_mask = _pad_cols(pool_ids, width), _pad_cols(pool_mask, width)
        self._pool_ids[cols] = _pad_cols(ids, width)
        self._pool_mask[cols] = _pad_cols(mask.to(torch.long), width)

    @torch.no_grad()
    def enqueue(
        self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor | None = None, gathered: bool = False,
        text_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Write every rank's momentum features into the queues, wrapping around.

        Pass local features (they are all-gathered here) or ``gathered=True`` ones. Unlike the
        official code there is no ``queue_size % batch_size == 0`` assertion (BLIP issue #101):
        writes wrap around the end of the ring buffer.
        """
        if not gathered:
            image_feat, text_feat = dist.concat_all_gather(image_feat), dist.concat_all_gather(text_feat)
            idx = dist.concat_all_gather(idx) if idx is not None else None
        Q = self.queue_size
        if image_feat.shape[0] > Q:  # keep only the newest Q
            image_feat, text_feat = image_feat[-Q:], text_feat[-Q:]
            idx = idx[-Q:] if idx is not None else None
            text_ids = None if text_ids is None else (text_ids[0][-Q:], text_ids[1][-Q:])
        ptr_buf = getattr(self, self.ptr_name)
        ptr = int(ptr_buf)
        cols = (ptr + torch.arange(image_feat.shape[0], device=image_feat.device)) % Q
        self.image_queue[:, cols] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, cols] = text_feat.T.to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[:, cols] = idx.view(1, -1)
        if text_ids is not None:
            self._pool_write(cols, *text_ids)
        ptr_buf[0] = (ptr + image_feat.shape[0]) % Q

    @torch.no_grad()
    def itm_text_candidates(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM's negative-text candidates in the column order of :meth:`itc_step`'s similarities
        — every rank's batch, then the queue — taken *before* the step enqueues: ``(ids, mask)``
        ``(N, L)`` and the image id of each ``(N,)`` (``-1`` for a queue column never written, so
        that no row takes it)."""
        ids_g, mask_g = _gather_texts(input_ids, attention_mask, self.cfg.text.max_position_embeddings)
        pool_ids, pool_mask = self._text_pool()
        width = max(ids_g.shape[1], pool_ids.shape[1])
        ids = torch.cat([_pad_cols(ids_g, width), _pad_cols(pool_ids, width)])
        mask = torch.cat([_pad_cols(mask_g.to(torch.long), width), _pad_cols(pool_mask, width)])
        pool_idx = self.idx_queue.view(-1).clone().masked_fill(pool_mask.sum(1) == 0, -1)
        return ids, mask, torch.cat([dist.concat_all_gather(idx.view(-1)), pool_idx])

    def itc_step(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        alpha: float,
        idx: torch.Tensor | None,
        use_idx_queue: bool,
        image_embeds: torch.Tensor | None = None,
        text_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """ITC loss against every rank's momentum features plus the queues, then enqueue.

        The in-batch columns hold the *global* batch (all ranks' momentum features, as open_clip
        gathers), so a 2-process run sees the same negatives as a 1-process run of the same
        global batch; the official code used only the local batch (identical with one process).
        Positives: the diagonal, or with ``idx`` every column of the same image id
        (``use_idx_queue``: the queue's ids too, as BLIP's retrieval fine-tuning).
        ``text_ids``: every rank's ``(ids, mask)``, kept beside the queued features (ITM's negatives
        from the queue, :meth:`itm_text_candidates`).
        Returns ``(loss, sim_i2t, sim_t2i, offset)``; ``offset`` is where this rank's own batch
        starts among the columns.
        """
        B = image.shape[0]
        with torch.no_grad():
            self.momentum_update()
            image_feat_m, text_feat_m = self.momentum_features(image, input_ids, attention_mask, image_embeds)
            image_m_g, text_m_g = dist.concat_all_gather(image_feat_m), dist.concat_all_gather(text_feat_m)
            image_feat_all = torch.cat([image_m_g.T, self.image_queue.clone()], dim=1)
            text_feat_all = torch.cat([text_m_g.T, self.text_queue.clone()], dim=1)
            offset = dist.rank() * B
            idx_g = dist.concat_all_gather(idx.view(-1)) if idx is not None else None
            if idx is None:
                targets = losses.diagonal_targets(B, image_feat_all.shape[1], image.device, offset)
            else:
                queue_ids = self.idx_queue.view(-1) if use_idx_queue else torch.full_like(
                    self.image_queue[0], -100, dtype=torch.long)
                targets = losses.idx_targets(idx.view(-1), torch.cat([idx_g, queue_ids]))
        loss, sim_i2t, sim_t2i = losses.itc_loss(
            image_feat, text_feat, image_feat_all, text_feat_all, targets, self.temp, alpha, image_feat_m, text_feat_m
        )
        self.enqueue(image_m_g, text_m_g, idx_g if use_idx_queue else None, gathered=True, text_ids=text_ids)
        return loss, sim_i2t, sim_t2i, offset

    def itm_loss(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        weights_t2i: torch.Tensor,
        weights_i2t: torch.Tensor,
        text_candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ITM over ``[positives; (text, hard-negative image); (hard-negative text, image)]``.

        ``weights_t2i[b]`` is the sampling distribution over images for text ``b`` (zero at its
        positives); ``weights_i2t`` likewise over texts: the batch's, or ``text_candidates``
        ``(ids, mask)`` (:meth:`MomentumITC.itm_text_candidates`). ``itm_negatives_per_pair``
        negatives of each kind per sample (BLIP: one), weighed by :func:`losses.itm_cross_entropy`.
        """
        B, K = input_ids.shape[0], self.itm_negatives_per_pair
        with torch.no_grad():
            neg_img = _by_draw(losses.sample_hard_negatives(weights_t2i, k=K))  # (K*B,) image index per text
            neg_txt = _by_draw(losses.sample_hard_negatives(weights_i2t, k=K))  # (K*B,) text index per image
        if text_candidates is None:
            neg_ids, neg_mask = input_ids[neg_txt], attention_mask[neg_txt]
        else:
            neg_ids, neg_mask = text_candidates[0][neg_txt], text_candidates[1][neg_txt]
            width = max(input_ids.shape[1], int(neg_mask.sum(1).max()))
            input_ids, attention_mask = _pad_cols(input_ids, width), _pad_cols(attention_mask, width)
            neg_ids, neg_mask = neg_ids[:, :width], neg_mask[:, :width].to(attention_mask.dtype)  # candidates: >= width
        ids = torch.cat([input_ids, input_ids.repeat(K, 1), neg_ids])
        mask = torch.cat([attention_mask, attention_mask.repeat(K, 1), neg_mask])
        rows = torch.arange(B, device=ids.device)
        logits = self.itm_logits(image_embeds, ids, mask, torch.cat([rows, neg_img, rows.repeat(K)]))  # ((1+2K)B, 2)
        return losses.itm_cross_entropy(logits, B, K)

    #: ``itm_negatives`` (``config.ITM_NEGATIVES``): a training choice, not architecture, so it is
    #: not in the checkpoint's config; the trainer sets it from its section of params.yaml
    itm_negatives: str = "hard"
    #: ``itm_negatives_per_pair``: negatives of each kind ITM scores per positive (BLIP: 1); a
    #: training choice like ``itm_negatives``
    itm_negatives_per_pair: int = 1

    def negative_weights(
        self, sim: torch.Tensor, positive: torch.Tensor, eps: float = 1e-4, own: slice | None = None
    ) -> torch.Tensor:
        """ITM sampling weights over the batch's candidates by ``self.itm_negatives``; ``sim`` is
        ``(B, N)`` with row ``b``'s own pair in column ``b`` (or ``own.start + b``)."""
        own_sim = sim[:, own if own is not None else slice(0, sim.shape[0])].diagonal()
        return losses.itm_negative_weights(sim, positive, own_sim, self.itm_negatives, eps)

    def clamp_temp(self) -> None:
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)


class BlipPretrain(CaptionMixin, MomentumITC):
    """BLIP pre-training model: ITC + ITM + LM with encoder/decoder sharing (Table 3)."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.text_encoder = TextTransformer(cfg.text, cfg.encoder_width)
        self.text_decoder = TextDecoder(cfg.text, cfg.encoder_width)
        self._build_itc(cfg, with_idx=False)
        self._init_text_weights()
        self.shared_params = tie_text_towers(self.text_encoder, self.text_decoder.bert, cfg.sharing)
        self._build_momentum()

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.4,
        idx: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        prompt_length: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Losses ``{"itc", "itm", "lm"}`` for a batch of (image, caption) pairs.

        ``input_ids``/``attention_mask``: ``(B, T)`` tokenised captions ([CLS] ... [SEP], right
        padded); the role token at position 0 is set per branch. ``idx`` (image ids) makes
        captions of the same image positives; ``decoder_input_ids`` (e.g. the captions with
        the prompt) replace the LM branch's text, whose first ``prompt_length`` positions are
        not supervised — together, fine-tuning one model as captioner *and* filter (Table 4).
        """
        self.clamp_temp()
        B = image.shape[0]
        image_embeds = self.encode_image(image)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(input_ids, attention_mask)
        loss_itc, sim_i2t, sim_t2i, off = self.itc_step(
            image, input_ids, attention_mask, image_feat, text_feat, alpha, idx, use_idx_queue=False,
            image_embeds=image_embeds,
        )

        with torch.no_grad():  # §3.4: hard negatives by ITC similarity within the local batch
            if idx is None:
                positive = torch.eye(B, dtype=torch.bool, device=image.device)
            else:
                positive = idx.view(-1, 1) == idx.view(1, -1)
            w_t2i = self.negative_weights(sim_t2i[:, off : off + B], positive)
            w_i2t = self.negative_weights(sim_i2t[:, off : off + B], positive)
        loss_itm = self.itm_loss(image_embeds, input_ids, attention_mask, w_t2i, w_i2t)

        if decoder_input_ids is None:
            decoder_input_ids, decoder_attention_mask = input_ids, attention_mask
        logits = self.text_decoder(decoder_input_ids, decoder_attention_mask, image_embeds)
        labels = losses.lm_labels(decoder_input_ids, decoder_attention_mask, prompt_length)
        loss_lm = losses.lm_loss(logits, labels, self.cfg.label_smoothing)
        return {"itc": loss_itc, "itm": loss_itm, "lm": loss_lm}


class BlipRetrieval(MomentumITC):
    """Retrieval / filter model (``BLIP_Retrieval``): ITC + ITM, positives by image id."""

    ptr_name = "ptr_queue"

    def __init__(self, cfg: BlipConfig, negative_all_rank: bool = False):
        super().__init__(cfg)
        self.text_encoder = TextTransformer(cfg.text, cfg.encoder_width)
        self._build_itc(cfg, with_idx=True)
        self._init_text_weights()
        self._build_momentum()
        self.negative_all_rank = negative_all_rank

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor,
        alpha: float = 0.4,
    ) -> dict[str, torch.Tensor]:
        """Losses ``{"itc", "itm"}``; ``idx`` ``(B,)`` image ids: same id = positive pair."""
        self.clamp_temp()
        idx = idx.view(-1, 1)
        image_embeds = self.encode_image(image)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(input_ids, attention_mask)
        from_queue = self.itm_negatives_from == "queue"
        cands = self.itm_text_candidates(input_ids, attention_mask, idx) if from_queue else None
        loss_itc, sim_i2t, _, off = self.itc_step(
            image, input_ids, attention_mask, image_feat, text_feat, alpha, idx, use_idx_queue=True,
            image_embeds=image_embeds, text_ids=None if cands is None else _batch_rows(cands, idx.shape[0]),
        )

        if self.negative_all_rank and dist.world_size() > 1:
            loss_itm = self._itm_all_rank(image_embeds, image_feat, text_feat, input_ids, attention_mask, idx)
        else:
            with torch.no_grad():
                same = idx == idx.T
                w_t2i = self.negative_weights(text_feat @ image_feat.T / self.temp, same, eps=0)
                if cands is None:
                    w_i2t = self.negative_weights(image_feat @ text_feat.T / self.temp, same, eps=0)
                else:  # the texts of the batch and of the queue, by the step's own similarities
                    cand_idx = cands[2].view(1, -1)
                    excluded = (idx == cand_idx) | (cand_idx == -1)
                    w_i2t = self.negative_weights(sim_i2t, excluded, eps=0, own=slice(off, off + idx.shape[0]))
            loss_itm = self.itm_loss(image_embeds, input_ids, attention_mask, w_t2i, w_i2t,
                                     text_candidates=None if cands is None else cands[:2])
        return {"itc": loss_itc, "itm": loss_itm}

    def _itm_all_rank(self, image_embeds, image_feat, text_feat, input_ids, attention_mask, idx):
        """Hard negatives drawn from every rank's batch; image tokens gathered *with* gradient."""
        B = input_ids.shape[0]
        idx_w = dist.concat_all_gather(idx)
        image_feat_w = dist.concat_all_gather(image_feat)
        text_feat_w = dist.concat_all_gather(text_feat)
        image_embeds_w = dist.gather_with_grad(image_embeds)
        ids_w = dist.concat_all_gather(input_ids)
        mask_w = dist.concat_all_gather(attention_mask)
        with torch.no_grad():
            same = idx == idx_w.T  # (B, W*B)
            own = slice(dist.rank() * B, dist.rank() * B + B)  # this rank's rows among the gathered columns
            w_t2i = self.negative_weights(text_feat @ image_feat_w.T / self.temp, same, eps=0, own=own)
            w_i2t = self.negative_weights(image_feat @ text_feat_w.T / self.temp, same, eps=0, own=own)
            neg_img = losses.sample_hard_negatives(w_t2i)
            neg_txt = losses.sample_hard_negatives(w_i2t)
        ids = torch.cat([input_ids, input_ids, ids_w[neg_txt]])
        mask = torch.cat([attention_mask, attention_mask, mask_w[neg_txt]])
        imgs = torch.cat([image_embeds, image_embeds_w])  # local rows first, then every rank's
        rows = torch.arange(B, device=ids.device)
        logits = self.itm_logits(imgs, ids, mask, torch.cat([rows, B + neg_img, rows]))
        return losses.itm_cross_entropy(logits, B)


def _by_draw(drawn: torch.Tensor) -> torch.Tensor:
    """``(B,)`` or ``(B, K)`` drawn indices as ``(K*B,)``: every row's first draw, then every row's second..."""
    return drawn if drawn.dim() == 1 else drawn.T.reshape(-1)


class BlipCaptioner(CaptionMixin, BlipBase):
    """Captioner (``BLIP_Decoder``): ViT + image-grounded text decoder, LM with a prompt."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.text_decoder = TextDecoder(cfg.text, cfg.encoder_width)
        init_bert_weights(self.text_decoder)

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0
    ) -> dict[str, torch.Tensor]:
        """``{"lm"}``: ids are ``prompt + caption`` ([CLS] a picture of ... [SEP]); the first
        ``prompt_length`` positions are not supervised (§1.8 of blip-facts: 4 for BERT)."""
        image_embeds = self.encode_image(image)
        logits = self.text_decoder(input_ids, attention_mask, image_embeds)
        labels = losses.lm_labels(input_ids, attention_mask, prompt_length)
        return {"lm": losses.lm_loss(logits, labels, self.cfg.label_smoothing)}


MODEL_CLASSES: dict[str, type[BlipBase]] = {
    "BlipPretrain": BlipPretrain,
    "BlipRetrieval": BlipRetrieval,
    "BlipCaptioner": BlipCaptioner,
}


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` ``(N, L)`` right-padded with zeros (pad id, mask 0) to ``width`` columns."""
    return t if t.shape[1] >= width else F.pad(t, (0, width - t.shape[1]))


def _gather_texts(ids: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's token ids and masks (padded to ``width`` first, as ranks' batches differ in length)."""
    if dist.world_size() == 1:
        return ids, mask
    return dist.concat_all_gather(_pad_cols(ids, width)), dist.concat_all_gather(_pad_cols(mask, width))


def _batch_rows(cands: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (ids, mask) of every rank's batch among :meth:`MomentumITC.itm_text_candidates` (its
    first rows): what the step enqueues beside the features, gathered once."""
    n = batch * dist.world_size()
    return cands[0][:n], cands[1][:n]
