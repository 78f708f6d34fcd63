"""Caption generation with a key/value cache: greedy, beam search and nucleus sampling.

Our own loop (blip-facts §6.3: BLIP broke with every change of ``GenerationMixin``), with the
semantics of ``transformers``' ``generate`` so outputs match it id for id:

* ``max_length``/``min_length`` count the prompt tokens ([DEC] a picture of = 4), as in BLIP's
  configs (max 20, min 5);
* beam search keeps ``2 * num_beams`` candidates per step and ranks finished hypotheses by
  transformers 4.15's length rule (``length_rule="official"``, BLIP's captions) or transformers
  5's (``"transformers"``), each with its own early-stop heuristic (``_beam_search``);
* nucleus sampling applies the repetition penalty to the logits, then min-length, then top-k, then
  top-p: transformers' processor order, with its TopKLogitsWarper/TopPLogitsWarper (BLIP ran
  ``top_p=0.9`` with the default ``top_k=50``); the draws are our own, seeded per image.

Speed-ups that keep the numbers: image cross-attention keys/values are projected once per
image (not once per beam and step), self-attention keys/values live in preallocated buffers,
and only the last position goes through the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .med import TextDecoder


def _repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on every token already in ``seqs``: divide positive scores, multiply negative."""
    if penalty == 1.0:
        return scores
    s = torch.gather(scores, 1, seqs)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter(1, seqs, s)


def _warp(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """transformers 5's TopKLogitsWarper then TopPLogitsWarper, op for op (filter value -inf,
    ``min_tokens_to_keep`` 1): the probabilities ``(R, V)`` of the kept tokens, 0 elsewhere, not
    renormalised. Top-k removes the tokens scoring below the k-th (a tie with it stays); top-p sorts
    ascending and removes where the cumulative probability is <= 1 - top_p, the most likely never."""
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    p = scores.softmax(-1)
    if top_p < 1.0:  # transformers adds the warper only for top_p < 1
        sorted_logits, sorted_idx = scores.sort(dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        p = p.masked_fill(remove.scatter(1, sorted_idx, remove), 0.0)
    return p


def _order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates most likely first, tied logits by token id: one order for both paths, so a draw
    does not depend on which path a row took."""
    o = idx.argsort(dim=-1)
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    o = vals.argsort(dim=-1, descending=True, stable=True)
    return vals.gather(1, o), idx.gather(1, o)


def _candidates(scores: torch.Tensor, top_k: int, top_p: float, k: int | None = 256) -> tuple:
    """Each row's sampling distribution as ``(probs, idx, exact)``: ``probs`` ``(R, C)`` (not
    renormalised) over the token ids ``idx`` (most likely first; every other token has probability
    0). Rows where ``exact`` is False need the whole vocabulary: redo them with ``k=None``, which
    runs transformers' warpers as they are (:func:`_warp`).

    The fast path sorts only the top ``top_k`` tokens (top-p alone: the top ``k``) and applies the
    same rules to them; a row is exact when the outcome cannot depend on the rest: no tie across
    the k-th token, none across the top-p cut (transformers' unstable sort decides which of tied
    tokens it keeps), and with top-p alone a nucleus inside the ``k`` (almost always, for a trained
    captioner), where a token is kept while the mass ranked above it is < top_p (transformers'
    rule, ascending cumulative mass > 1 - top_p, up to float rounding at the boundary).
    """
    R, V = scores.shape
    top_k = top_k if top_k < V else 0  # top_k >= V removes nothing
    if k is None or (not top_k and (k >= V or top_p >= 1.0)):  # the whole vocabulary
        p = _warp(scores, top_k, top_p)
        m = int((p > 0).sum(-1).max())  # candidates: the kept tokens, in _order's order
        idx = _order(*scores.masked_fill(p == 0, float("-inf")).topk(m, dim=-1))[1]
        return p.gather(1, idx), idx, torch.ones(R, dtype=torch.bool, device=scores.device)
    n = top_k or k
    vals, idx = scores.topk(n + 1, dim=-1)  # one more, to see a tie at the n-th
    exact = vals[:, n] != vals[:, n - 1]
    vals, idx = _order(vals[:, :n], idx[:, :n])
    if top_k:  # top-k renormalises over its n tokens; then top-p as transformers computes it
        p = vals.flip(-1).softmax(-1)  # ascending
        keep = torch.ones_like(p, dtype=torch.bool)
        if top_p < 1.0:
            keep = p.cumsum(-1) > 1 - top_p
            keep[:, -1] = True
        p, keep = p.flip(-1), keep.flip(-1)
    else:
        p = (vals - scores.logsumexp(-1, keepdim=True)).exp()
        above = p.cumsum(-1) - p  # mass ranked above each token
        exact &= above[:, -1] + p[:, -1] >= top_p  # the tokens after the n-th are out
        keep = above < top_p
        keep[:, 0] = True
    kept = keep.sum(-1, keepdim=True)  # a prefix
    last, first_out = vals.gather(1, kept - 1), vals.gather(1, kept.clamp(max=n - 1))
    exact &= ((kept == n) | (last != first_out)).squeeze(1)
    return p * keep, idx, exact


def nucleus_distribution(scores: torch.Tensor, top_k: int, top_p: float, k: int | None = 256) -> torch.Tensor:
    """``(B, V)``: the probabilities nucleus sampling draws from, i.e. the softmax of ``scores``
    after transformers' TopKLogitsWarper(``top_k``, 0 = off) and TopPLogitsWarper(``top_p``)."""
    probs, idx, exact = _candidates(scores, top_k, top_p, k)
    out = torch.zeros_like(scores, dtype=probs.dtype).scatter_(1, idx, probs / probs.sum(-1, keepdim=True))
    if not bool(exact.all()):
        rows = (~exact).nonzero().squeeze(1)
        out[rows] = nucleus_distribution(scores[rows], top_k, top_p, k=None)
    return out


def _sample_nucleus(scores: torch.Tensor, top_k: int, top_p: float, u: torch.Tensor, k: int | None = 256):
    """One token per row from :func:`nucleus_distribution`, drawn by inverse CDF over the
    candidates (most likely first) with the uniforms ``u`` ``(B, 1)``."""
    probs, idx, exact = _candidates(scores, top_k, top_p, k)
    cdf = probs.cumsum(-1)
    pos = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[1] - 1)
    tokens = idx.gather(1, pos).squeeze(1)
    if not bool(exact.all()):
        rows = (~exact).nonzero().squeeze(1)
        tokens[rows] = _sample_nucleus(scores[rows], top_k, top_p, u[rows], k=None)
    return tokens


def _uniforms(batch: int, steps: int, seeds, generator, device) -> torch.Tensor:
    """``(batch, steps)`` uniforms; with per-row ``seeds`` a row's draws do not depend on its batch."""
    if seeds is not None:
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")
        rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(rows).to(device)
    return torch.rand(batch, steps, generator=generator).to(device)


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    image_embeds: torch.Tensor,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    seeds: list[int] | None = None,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> torch.Tensor:
    """Generate token ids ``(B, L)``, prompt included, padded with ``pad_token_id`` after [SEP].

    ``image_embeds``: ``(B, N, D_v)`` ViT tokens. ``prompt_ids``: ``[DEC-or-CLS, prompt...]``
    (position 0 is set to [DEC] by the decoder). Nucleus sampling is deterministic given
    ``seeds`` (one per output row; independent of batch composition) or ``generator``.
    ``repeats``: ``repeats`` samples per image (rows ``i * repeats + j``, ``B * repeats`` in all),
    the prompt run once per image and its cache fanned out (nucleus or greedy; beam search keeps
    one caption per image).
    """
    if len(prompt_ids) >= cfg.max_length:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_length={cfg.max_length}")
    prompt_ids = [decoder.cfg.bos_token_id, *prompt_ids[1:]]  # [DEC] at position 0, also in the output
    if cfg.method == "beam" and cfg.num_beams > 1:
        if repeats != 1:
            raise ValueError(f"repeats={repeats}: beam search gives one caption per image; sample several with nucleus")
        return _beam_search(decoder, image_embeds, prompt_ids, cfg, eos_token_id, pad_token_id)
    return _sample_or_greedy(decoder, image_embeds, prompt_ids, cfg, eos_token_id, pad_token_id, seeds, generator,
                             repeats)


def _prefill(decoder, image_embeds, prompt_ids, max_length, repeats=1):
    """Run the prompt once per image; with ``repeats`` (beams) fan the cache and logits out."""
    B, device = image_embeds.shape[0], image_embeds.device
    cache = decoder.new_cache(image_embeds, B, max_length)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device).expand(B, -1)
    logits = decoder(prompt, None, None, cache=cache, last_only=True)[:, -1]
    if repeats > 1:
        cache = cache.expand(repeats)
        prompt, logits = prompt.repeat_interleave(repeats, 0), logits.repeat_interleave(repeats, 0)
    return cache, prompt, logits


def _sample_or_greedy(decoder, image_embeds, prompt_ids, cfg, eos, pad, seeds, generator, repeats=1):
    B, P, L = image_embeds.shape[0] * repeats, len(prompt_ids), cfg.max_length
    device = image_embeds.device
    cache, prompt, logits = _prefill(decoder, image_embeds, prompt_ids, L, repeats)
    seqs = torch.full((B, L), pad, dtype=torch.long, device=device)
    seqs[:, :P] = prompt
    sample = cfg.method == "nucleus"
    u = _uniforms(B, L - P, seeds, generator, device) if sample else None
    active = torch.arange(B, device=device)  # rows still generating; finished rows leave the batch
    cur = P
    while cur < L:
        scores = _repetition_penalty(logits.float(), seqs[active, :cur], cfg.repetition_penalty)
        if cur < cfg.min_length:
            scores[:, eos] = float("-inf")
        if sample:
            nxt = _sample_nucleus(scores, cfg.top_k, cfg.top_p, u[active, cur - P : cur - P + 1])
        else:
            nxt = scores.argmax(dim=-1)
        seqs[active, cur] = nxt
        cur += 1
        done = nxt == eos
        if bool(done.all()) or cur == L:
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.select(keep)
            active, nxt = active[keep], nxt[keep]
        logits = decoder(nxt[:, None], None, None, cache=cache, last_only=True)[:, -1]
    return seqs[:, :cur]


def _beam_search(decoder, image_embeds, prompt_ids, cfg, eos, pad):
    """Beam search as transformers' ``generate``; ``cfg.length_rule`` picks the version.

    Both keep the ``2 * num_beams`` best continuations per step; a [SEP] among the top
    ``num_beams`` finishes a hypothesis (the ``num_beams`` best hypotheses are kept), the best
    ``num_beams`` others run on. Per version (``cur`` = tokens so far, prompt included; ``P`` the
    prompt; ``lp`` the length penalty):

    * ``transformers`` (5.x ``_beam_search``): a hypothesis finishing at step ``cur`` scores
      ``sum / (cur + 1 - P) ** lp`` (generated tokens, [SEP] included); at ``max_length`` the top
      continuations finish too; an image is done when the best running beam's
      ``sum / (cur + 1 - P) ** lp`` cannot beat the worst of ``num_beams`` hypotheses.
    * ``official`` (4.15 ``BeamSearchScorer``/``BeamHypotheses``, BLIP's released captions): a
      hypothesis is ``input_ids`` *before* [SEP] is appended, scoring ``sum / cur ** lp`` (prompt
      included, [SEP] not); an image is done when it has ``num_beams`` hypotheses and the worst is
      >= the best continuation's (possibly a finished one's) ``sum / cur ** lp``; at ``max_length``
      the running beams of images not done join as hypotheses scored ``sum / max_length ** lp``.
      Scores are compared in float64, as 4.15 did in Python floats.
    """
    B, nb, P, L = image_embeds.shape[0], cfg.num_beams, len(prompt_ids), cfg.max_length
    official = cfg.length_rule == "official"
    lp = cfg.length_penalty
    device = image_embeds.device
    cache, prompt, logits = _prefill(decoder, image_embeds, prompt_ids, L, repeats=nb)
    V = logits.shape[-1]
    k = 2 * nb  # candidates kept per step, enough to leave nb running after EOS hits
    running = torch.full((B, nb, L), pad, dtype=torch.long, device=device)
    running[:, :, :P] = prompt.view(B, nb, P)
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    fin = running.clone()
    fin_scores = torch.full((B, nb), -1e9, device=device, dtype=torch.float64 if official else torch.float32)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
    unsatisfied = torch.ones(B, 1, dtype=torch.bool, device=device)  # not done (early-stop heuristic)
    in_top = torch.arange(k, device=device) < nb
    offsets = torch.arange(B, device=device)[:, None] * nb

    def merge(seqs, scores, done):
        """Keep the nb best of the finished hypotheses and the new ones (-1e9 on non-candidates)."""
        m_seqs, m_scores = torch.cat([fin, seqs], 1), torch.cat([fin_scores, scores.to(fin_scores.dtype)], 1)
        keep = m_scores.topk(nb, dim=1).indices
        return (torch.gather(m_seqs, 1, keep[..., None].expand(-1, -1, L)), torch.gather(m_scores, 1, keep),
                torch.gather(torch.cat([fin_done, done], 1), 1, keep))

    cur = P
    while True:
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = _repetition_penalty(logp, running.view(B * nb, L)[:, :cur], cfg.repetition_penalty)
        if cur < cfg.min_length:
            logp[:, eos] = float("-inf")
        total = (logp.view(B, nb, V) + running_scores[..., None]).view(B, nb * V)
        top_lp, top_idx = total.topk(k, dim=1)
        src_beam, tok = top_idx // V, top_idx % V
        cand = torch.gather(running, 1, src_beam[..., None].expand(-1, -1, L)).clone()
        cand[:, :, cur] = tok
        # 4.15 does not stop a beam at max_length: the running beams are finalised after the loop
        hits = (tok == eos) if official else (tok == eos) | (cur + 1 >= L)

        # beams that keep running: best nb candidates that did not stop
        run_lp = top_lp + hits.float() * -1e9
        nxt = run_lp.topk(nb, dim=1).indices
        running = torch.gather(cand, 1, nxt[..., None].expand(-1, -1, L))
        running_scores = torch.gather(run_lp, 1, nxt)
        beam_src = torch.gather(src_beam, 1, nxt)

        # finished hypotheses: stopped candidates among the top nb, length-normalised
        just = hits & in_top[None]
        length = cur if official else cur + 1 - P
        fin_lp = top_lp.to(fin_scores.dtype) / float(length) ** lp
        fin_lp = fin_lp + (~unsatisfied).to(fin_lp.dtype) * -1e9 + (~just).to(fin_lp.dtype) * -1e9
        fin, fin_scores, fin_done = merge(cand, fin_lp, just)
        if official:  # BeamHypotheses.is_done(next_scores.max(), cur_len), early_stopping False
            best = top_lp[:, :1].to(fin_scores.dtype) / float(cur) ** lp
            done = fin_done.all(1, keepdim=True) & (fin_scores.min(1, keepdim=True).values >= best)
            unsatisfied = unsatisfied & ~done

        cache.reorder((beam_src + offsets).view(-1))
        cur += 1
        if official:
            if not bool(unsatisfied.any()) or cur >= L:
                break
        else:
            best_possible = running_scores[:, :1] / float(cur - P) ** lp
            worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, -1e9))
            unsatisfied = unsatisfied & (best_possible > worst).any(-1, keepdim=True)
            if not bool(unsatisfied.any()) or bool(hits.all()):
                break
        logits = decoder(running[:, :, cur - 1].reshape(-1, 1), None, None, cache=cache, last_only=True)[:, -1]

    if official:  # BeamSearchScorer.finalize: images not done add their running beams (length cur)
        final = running_scores.to(fin_scores.dtype) / float(cur) ** lp + (~unsatisfied).to(fin_scores.dtype) * -1e9
        fin, fin_scores, fin_done = merge(running, final, unsatisfied.expand(-1, nb))

    best = fin[:, 0]  # (B, L)
    is_eos = best[:, P:] == eos
    ends = torch.where(is_eos.any(1), is_eos.float().argmax(1) + P + 1, torch.full((B,), L, device=device))
    out_len = int(ends.max())
    best = best[:, :out_len].clone()
    best[torch.arange(out_len, device=device)[None] >= ends[:, None]] = pad
    return best
