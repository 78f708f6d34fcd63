"""Caption generation with a key/value cache: greedy, beam search and nucleus sampling.

Our own loop (blip-facts §6.3: BLIP broke with every change of ``GenerationMixin``), with the
semantics of ``transformers``' ``generate`` so outputs match it id for id:

* ``max_length``/``min_length`` count the prompt tokens ([DEC] a picture of = 4), as in BLIP's
  configs (max 20, min 5);
* beam search keeps ``2 * num_beams`` candidates per step, scores finished hypotheses by
  ``sum log p / generated_len ** length_penalty`` and stops by the same early-stop heuristic;
* nucleus sampling applies the repetition penalty to the logits, then min-length, then top-p\n  (same distribution as transformers' TopPLogitsWarper; the draws are our own, seeded per image).

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


def _sample_top_p(scores: torch.Tensor, top_p: float, u: torch.Tensor, k: int = 256) -> torch.Tensor:
    """Nucleus sampling: one token per row from the smallest set of most likely tokens whose
    probability mass reaches ``top_p`` (a token is kept while the mass ranked above it is
    < top_p, the most likely always), drawn by inverse CDF with the uniforms ``u`` ``(B, 1)``.

    Rows whose nucleus lies inside their top ``k`` tokens (almost always, for a trained
    captioner) sort only those ``k``; the others sort the whole vocabulary.
    """
    V = scores.shape[1]
    k = min(k, V)
    vals, idx = scores.topk(k, dim=-1)  # descending
    p = (vals - scores.logsumexp(-1, keepdim=True)).exp()
    above = p.cumsum(-1) - p  # mass ranked above each token
    fits = (above[:, -1] + p[:, -1] >= top_p) | (k == V)
    keep = above < top_p
    keep[:, 0] = True
    cdf = (p * keep).cumsum(-1)
    pos = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=k - 1)
    tokens = idx.gather(1, pos).squeeze(1)
    if not bool(fits.all()):
        rows = (~fits).nonzero().squeeze(1)
        tokens[rows] = _sample_top_p(scores[rows], top_p, u[rows], k=V)
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
) -> torch.Tensor:
    """Generate token ids ``(B, L)``, prompt included, padded with ``pad_token_id`` after [SEP].

    ``image_embeds``: ``(B, N, D_v)`` ViT tokens. ``prompt_ids``: ``[DEC-or-CLS, prompt...]``
    (position 0 is set to [DEC] by the decoder). Nucleus sampling is deterministic given
    ``seeds`` (one per image; independent of batch composition) or ``generator``.
    """
    if len(prompt_ids) >= cfg.max_length:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_length={cfg.max_length}")
    prompt_ids = [decoder.cfg.bos_token_id, *prompt_ids[1:]]  # [DEC] at position 0, also in the output
    if cfg.method == "beam" and cfg.num_beams > 1:
        return _beam_search(decoder, image_embeds, prompt_ids, cfg, eos_token_id, pad_token_id)
    return _sample_or_greedy(decoder, image_embeds, prompt_ids, cfg, eos_token_id, pad_token_id, seeds, generator)


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


def _sample_or_greedy(decoder, image_embeds, prompt_ids, cfg, eos, pad, seeds, generator):
    B, P, L = image_embeds.shape[0], len(prompt_ids), cfg.max_length
    device = image_embeds.device
    cache, prompt, logits = _prefill(decoder, image_embeds, prompt_ids, L)
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
            nxt = _sample_top_p(scores, cfg.top_p, u[active, cur - P : cur - P + 1])
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
    B, nb, P, L = image_embeds.shape[0], cfg.num_beams, len(prompt_ids), cfg.max_length
    device = image_embeds.device
    cache, prompt, logits = _prefill(decoder, image_embeds, prompt_ids, L, repeats=nb)
    V = logits.shape[-1]
    k = 2 * nb  # candidates kept per step, enough to leave nb running after EOS hits
    running = torch.full((B, nb, L), pad, dtype=torch.long, device=device)
    running[:, :, :P] = prompt.view(B, nb, P)
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    fin = running.clone()
    fin_scores = torch.full((B, nb), -1e9, device=device)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
    unsatisfied = torch.ones(B, 1, dtype=torch.bool, device=device)  # early-stop heuristic
    in_top = torch.arange(k, device=device) < nb
    offsets = torch.arange(B, device=device)[:, None] * nb
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
        hits = (tok == eos) | (cur + 1 >= L)

        # beams that keep running: best nb candidates that did not stop
        run_lp = top_lp + hits.float() * -1e9
        nxt = run_lp.topk(nb, dim=1).indices
        running = torch.gather(cand, 1, nxt[..., None].expand(-1, -1, L))
        running_scores = torch.gather(run_lp, 1, nxt)
        beam_src = torch.gather(src_beam, 1, nxt)

        # finished hypotheses: stopped candidates among the top nb, length-normalised
        just = hits & in_top[None]
        fin_lp = top_lp / float(cur + 1 - P) ** cfg.length_penalty
        fin_lp = fin_lp + (~unsatisfied).float() * -1e9 + (~just).float() * -1e9
        m_seqs, m_scores = torch.cat([fin, cand], 1), torch.cat([fin_scores, fin_lp], 1)
        m_done = torch.cat([fin_done, just], 1)
        keep = m_scores.topk(nb, dim=1).indices
        fin = torch.gather(m_seqs, 1, keep[..., None].expand(-1, -1, L))
        fin_scores, fin_done = torch.gather(m_scores, 1, keep), torch.gather(m_done, 1, keep)

        cache.reorder((beam_src + offsets).view(-1))
        cur += 1
        best_possible = running_scores[:, :1] / float(cur - P) ** cfg.length_penalty
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, -1e9))
        unsatisfied = unsatisfied & (best_possible > worst).any(-1, keepdim=True)
        if not bool(unsatisfied.any()) or bool(hits.all()):
            break
        logits = decoder(running[:, :, cur - 1].reshape(-1, 1), None, None, cache=cache, last_only=True)[:, -1]

    best = fin[:, 0]  # (B, L)
    is_eos = best[:, P:] == eos
    ends = torch.where(is_eos.any(1), is_eos.float().argmax(1) + P + 1, torch.full((B,), L, device=device))
    out_len = int(ends.max())
    best = best[:, :out_len].clone()
    best[torch.arange(out_len, device=device)[None] >= ends[:, None]] = pad
    return best
