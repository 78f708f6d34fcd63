"""Decoding as BLIP ran it (transformers 4.15 under BLIP's code).

* Nucleus sampling = transformers' TopKLogitsWarper(50) then TopPLogitsWarper(0.9): our sampling
  distribution against the installed warpers, on random logits (ties and -inf included).
* Beam search ``length_rule="official"``: hand-computed cases where the 4.15 rule and the
  transformers 5 rule pick different captions, and id-for-id agreement with a line-by-line port
  of 4.15's ``beam_search`` + ``BeamSearchScorer`` + ``BeamHypotheses`` on tiny random models.
  (``length_rule="transformers"`` is held against the installed transformers in test_parity.py.)
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_model import micro_config, perturb_
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from blip.capfilt.config import CaptionConfig
from blip.model.blip import BlipCaptioner
from blip.model.config import GenerationConfig
from blip.model.generation import (
    _candidates,
    _sample_nucleus,
    generate,
    nucleus_distribution,
)


# -- nucleus = top-k then top-p -----------------------------------------------------------------
def _hf_distribution(scores, top_k, top_p):
    """What transformers 5 samples from: its warpers in ``_get_logits_processor``'s order."""
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def _logits(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "spread":  # rows from flat to peaked; top-p alone fits in 256 tokens for some only
        return torch.randn(48, 1000, generator=g) * torch.linspace(0.5, 6.0, 48)[:, None]
    if kind == "ties":  # integer logits in every other row: ties at the k-th token and the top-p cut
        s = torch.randn(48, 300, generator=g) * 2
        s[::2] = s[::2].round()
        return s
    if kind == "min_length":  # [SEP] forbidden (-inf), as before min_length
        s = torch.randn(48, 300, generator=g) * 3
        s[:, 3] = float("-inf")
        return s
    return torch.randn(48, 40, generator=g) * 2  # "small_vocab": top_k >= V keeps everything


@pytest.mark.parametrize("kind", ["spread", "ties", "min_length", "small_vocab"])
@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (50, 1.0), (0, 0.9), (5, 0.5), (1, 0.9), (50, 0.99)])
def test_nucleus_distribution_matches_transformers_top_k_then_top_p(kind, top_k, top_p):
    scores = _logits(kind)
    ref = _hf_distribution(scores, top_k, top_p)
    for k in (256, None):  # the fast path (few tokens sorted) and the whole vocabulary
        ours = nucleus_distribution(scores, top_k, top_p, k=k)
        assert torch.equal(ours > 0, ref > 0), (k, ((ours > 0) != (ref > 0)).sum())
        assert torch.allclose(ours, ref, atol=1e-6), (k, (ours - ref).abs().max())


def test_the_fast_paths_are_taken_and_their_fallbacks_too():
    # Both branches of each fast path are exercised by the parity test above.
    exact_topk = _candidates(_logits("ties"), 50, 0.9)[2]
    assert exact_topk.any() and not exact_topk.all()  # the integer rows tie at the 50th token or the cut
    exact_topp = _candidates(_logits("spread"), 0, 0.9)[2]
    assert exact_topp.any() and not exact_topp.all()  # some nuclei do not fit in 256 tokens
    assert _candidates(_logits("spread"), 50, 0.9)[0].shape[1] == 50  # top-k: only 50 sorted


def test_top_k_shrinks_the_nucleus_of_a_flat_distribution():
    scores = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1)) * 0.5  # flat: top-p keeps hundreds
    kept_topp = (nucleus_distribution(scores, 0, 0.9) > 0).sum(-1)
    kept_both = (nucleus_distribution(scores, 50, 0.9) > 0).sum(-1)
    assert (kept_topp > 500).all() and (kept_both <= 50).all()


@pytest.mark.parametrize("top_k,top_p", [(20, 0.8), (50, 0.9)])
def test_sampler_draws_from_the_warped_distribution_on_both_paths(top_k, top_p):
    torch.manual_seed(0)
    scores = torch.randn(1, 300) * 2
    scores[0, :2] = scores[0, :2].max() + 1.0  # two tied favourites
    target = _hf_distribution(scores, top_k, top_p)[0]
    n = 20000
    u = torch.rand(n, 1)
    rows = scores.expand(n, -1).contiguous()
    fast = _sample_nucleus(rows, top_k, top_p, u)
    full = _sample_nucleus(rows, top_k, top_p, u, k=None)
    assert torch.equal(fast, full)  # same draws: same candidates in the same order
    assert set(fast.unique().tolist()) <= set(target.nonzero().squeeze(1).tolist())
    freq = torch.bincount(fast, minlength=300).float() / n
    assert (freq - target).abs().max() < 0.01


def test_nucleus_settings_and_validation():
    cfg = GenerationConfig.nucleus()
    assert (cfg.method, cfg.top_p, cfg.top_k, cfg.repetition_penalty) == ("nucleus", 0.9, 50, 1.1)
    assert GenerationConfig().top_k == 50 and GenerationConfig().length_rule == "transformers"
    with pytest.raises(ValueError, match=r"length_rule='hf'.*\('official', 'transformers'\)"):
        GenerationConfig(length_rule="hf")
    with pytest.raises(ValueError, match="top_k=-1"):
        GenerationConfig(top_k=-1)
    with pytest.raises(ValueError, match="length_rule='4.15'"):
        CaptionConfig(length_rule="4.15")


def test_caption_config_passes_each_method_its_own_knobs():
    nucleus = CaptionConfig(top_k=7, length_rule="transformers").generation()
    assert (nucleus.top_k, nucleus.length_rule) == (7, "transformers")  # length_rule: GenerationConfig default
    assert CaptionConfig(top_k=7).identity() != CaptionConfig().identity()
    assert CaptionConfig(length_rule="transformers").identity() == CaptionConfig().identity()  # nucleus ignores it
    beam = CaptionConfig(method="beam").generation()
    assert (beam.method, beam.length_rule, beam.top_k) == ("beam", "official", 50)
    assert CaptionConfig(method="beam", length_rule="transformers").identity() != CaptionConfig(method="beam").identity()
    assert CaptionConfig(method="beam", top_k=7).identity() == CaptionConfig(method="beam").identity()


# -- beam search length rules: hand-computed -----------------------------------------------------
EOS, PAD, BOS = 3, 0, 2
A, B, C, D, E = 4, 5, 6, 7, 8
V = 10


class _PrefixCache:
    """Stands in for KVCache: remembers each row's tokens and follows the beams' reordering."""

    def __init__(self, seqs):
        self.seqs = seqs

    def expand(self, repeats):
        return _PrefixCache(self.seqs.repeat_interleave(repeats, 0))

    def reorder(self, index):
        self.seqs = self.seqs[index]

    select = reorder


class ScriptedDecoder:
    """A decoder whose next-token distribution is a table keyed by the generated tokens so far:
    the listed tokens get their probability, the others share what is left equally."""

    def __init__(self, table: dict, prompt_len: int):
        self.table, self.P = table, prompt_len
        self.cfg = SimpleNamespace(bos_token_id=BOS)

    def new_cache(self, image_embeds, batch, max_len):
        return _PrefixCache(torch.zeros(batch, 0, dtype=torch.long))

    def probs(self, generated: tuple) -> torch.Tensor:
        named = self.table.get(generated, {})
        p = torch.full((V,), (1.0 - sum(named.values())) / (V - len(named)), dtype=torch.float64)
        for tok, q in named.items():
            p[tok] = q
        return p

    def __call__(self, ids, mask, image_embeds, cache=None, last_only=False):
        cache.seqs = torch.cat([cache.seqs, ids], 1)
        rows = [self.probs(tuple(r[self.P :])) for r in cache.seqs.tolist()]
        return torch.stack(rows).log().float()[:, None]


def _lp(decoder, tokens):
    """Sum of log-probs of ``tokens`` generated one after the other."""
    return sum(math.log(float(decoder.probs(tuple(tokens[:i]))[t])) for i, t in enumerate(tokens))


PROMPT = [BOS, 9]  # P = 2: [DEC] + one prompt word
SCENARIOS = {
    # A [SEP] ends at step 2, B C [SEP] at step 3 (the last, max_length 5).
    "short_or_long_caption": (
        {(): {A: 0.5, B: 0.3, EOS: 0.001}, (A,): {EOS: 0.6, D: 0.2}, (B,): {C: 0.8},
         (B, C): {EOS: 0.76}, (A, D): {EOS: 0.5}},
        {"short": [A, EOS], "long": [B, C, EOS]},
    ),
    # A [SEP] ends at step 2; B D E runs into max_length 5 without [SEP].
    "caption_cut_at_max_length": (
        {(): {A: 0.5, B: 0.4}, (A,): {EOS: 0.6, C: 0.3}, (B,): {D: 0.9}, (B, D): {E: 0.45, EOS: 0.05}},
        {"short": [A, EOS], "long": [B, D, E]},
    ),
}


def _hand_scores(decoder, caption, rule, L=5):
    """The finished-caption score each rule gives, written out (length_penalty 1)."""
    S = _lp(decoder, caption)
    ended = caption[-1] == EOS
    if rule == "transformers":  # transformers 5: generated tokens, [SEP] included
        return S / len(caption)
    # transformers 4.15: input_ids before [SEP] is appended, prompt included; a cut caption has L
    return S / (len(PROMPT) + len(caption) - 1) if ended else S / L


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_length_rule_picks_its_own_winner(scenario):
    table, captions = SCENARIOS[scenario]
    decoder = ScriptedDecoder(table, len(PROMPT))
    # by hand: both captions are finished hypotheses under both rules; the rules rank them oppositely
    # short_or_long_caption: S(A [SEP]) = ln .5 + ln .6 = -1.204, S(B C [SEP]) = ln .3 + ln .8 + ln .76 = -1.701
    #   transformers: -1.204 / 2 = -0.602 < -1.701 / 3 = -0.567 -> "long"
    #   official:     -1.204 / 3 = -0.401 > -1.701 / 4 = -0.425 -> "short"
    # caption_cut_at_max_length: S(A [SEP]) = -1.204, S(B D E) = ln .4 + ln .9 + ln .45 = -1.820
    #   transformers: -1.204 / 2 = -0.602 > -1.820 / 3 = -0.607 -> "short"
    #   official:     -1.204 / 3 = -0.401 < -1.820 / 5 = -0.364 -> "long"
    expected = {}
    for rule in ("transformers", "official"):
        s = {name: _hand_scores(decoder, cap, rule) for name, cap in captions.items()}
        expected[rule] = max(s, key=s.get)
    assert expected["transformers"] != expected["official"]
    for rule in ("transformers", "official"):
        cfg = GenerationConfig(method="beam", num_beams=2, max_length=5, min_length=0, length_rule=rule)
        out = generate(decoder, torch.zeros(1, 1, 1), PROMPT, cfg, EOS, PAD)
        assert out[0].tolist() == PROMPT + captions[expected[rule]], rule


# -- beam search "official": a port of transformers 4.15 -----------------------------------------
EOS_M, PAD_M, BOS_M = 3, 0, 5  # micro_config's [SEP], [PAD] and [DEC]


class _Hypotheses415:
    """transformers 4.15 ``BeamHypotheses`` (generation_beam_search.py), unchanged."""

    def __init__(self, num_beams, length_penalty):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams, self.worst_score = [], 1e9

    def __len__(self):
        return len(self.beams)

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                sorted_next_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_next_scores[0][1]]
                self.worst_score = sorted_next_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):  # early_stopping=False, BLIP's setting
        if len(self) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty


def _beam_search_415(next_logits, prompt, batch, num_beams, max_length, min_length, repetition_penalty,
                     length_penalty):
    """4.15 ``generate(num_beams=...)`` of a decoder-only model: ``beam_search`` with
    RepetitionPenalty and MinLength processors, ``BeamSearchScorer.process``/``finalize``.
    ``next_logits(input_ids)`` -> ``(rows, V)`` logits of the next token."""
    input_ids = torch.tensor([prompt] * (batch * num_beams))
    beam_scores = torch.zeros(batch, num_beams)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses415(num_beams, length_penalty) for _ in range(batch)]
    done = [False] * batch
    while True:
        cur_len = input_ids.shape[-1]
        scores = F.log_softmax(next_logits(input_ids), dim=-1)
        if repetition_penalty != 1.0:  # RepetitionPenaltyLogitsProcessor
            s = torch.gather(scores, 1, input_ids)
            s = torch.where(s < 0, s * repetition_penalty, s / repetition_penalty)
            scores.scatter_(1, input_ids, s)
        if cur_len < min_length:  # MinLengthLogitsProcessor
            scores[:, EOS_M] = -float("inf")
        scores = scores + beam_scores[:, None].expand_as(scores)
        vocab = scores.shape[-1]
        scores = scores.view(batch, num_beams * vocab)
        next_scores, next_tokens = torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
        next_indices = next_tokens // vocab
        next_tokens = next_tokens % vocab
        # BeamSearchScorer.process
        nb_scores = torch.zeros(batch, num_beams)
        nb_tokens = torch.zeros(batch, num_beams, dtype=torch.long)
        nb_indices = torch.zeros(batch, num_beams, dtype=torch.long)
        for b in range(batch):
            if done[b]:
                nb_tokens[b, :] = PAD_M
                continue
            beam_idx = 0
            for rank, (tok, score, index) in enumerate(zip(next_tokens[b], next_scores[b], next_indices[b])):
                batch_beam_idx = b * num_beams + index
                if tok.item() == EOS_M:
                    if rank >= num_beams:
                        continue
                    hyps[b].add(input_ids[batch_beam_idx].clone(), score.item())
                else:
                    nb_scores[b, beam_idx], nb_tokens[b, beam_idx] = score, tok
                    nb_indices[b, beam_idx] = batch_beam_idx
                    beam_idx += 1
                if beam_idx == num_beams:
                    break
            done[b] = done[b] or hyps[b].is_done(next_scores[b].max().item(), cur_len)
        beam_scores = nb_scores.view(-1)
        input_ids = torch.cat([input_ids[nb_indices.view(-1), :], nb_tokens.view(-1, 1)], dim=-1)
        if all(done) or input_ids.shape[-1] >= max_length:
            break
    # BeamSearchScorer.finalize
    out = []
    for b in range(batch):
        if not done[b]:
            for j in range(num_beams):
                hyps[b].add(input_ids[b * num_beams + j], beam_scores[b * num_beams + j].item())
        best = sorted(hyps[b].beams, key=lambda x: x[0])[-1][1].tolist()  # noqa: FURB192 (4.15 as written)
        out.append(best + [EOS_M] if len(best) < max_length else best)
    return out



def _trim(seqs):
    return [row[: row.index(EOS_M, 4) + 1] if EOS_M in row[4:] else row for row in seqs.tolist()]


def _micro_captioner(seed, eos_bias):
    torch.manual_seed(seed)
    m = perturb_(BlipCaptioner(micro_config()), seed=seed).eval()
    with torch.no_grad():  # stronger image conditioning and a likelier [SEP]: captions end at different steps
        for layer in m.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(20)
        m.text_decoder.cls.predictions.bias[EOS_M] = eos_bias
    return m


@pytest.mark.parametrize("num_beams,max_length,min_length,repetition_penalty,length_penalty", [
    (3, 16, 5, 1.0, 1.0),  # BLIP's beam setting (scaled down)
    (3, 12, 6, 1.1, 1.0),  # eval_nocaps' repetition penalty
    (2, 10, 5, 1.0, 2.0),  # a length penalty: the exponent applies to each rule's own length
])
def test_official_rule_matches_a_port_of_transformers_4_15(num_beams, max_length, min_length, repetition_penalty,
                                                           length_penalty):
    prompt = [BOS_M, 10, 11, 12]  # [DEC] a picture of
    differs, ends = 0, set()
    for seed, eos_bias in [(0, 0.3), (1, 0.6), (2, 0.0)]:
        m = _micro_captioner(seed, eos_bias)
        img = 3 * torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            emb = m.encode_image(img)
            rep = emb.repeat_interleave(num_beams, 0)
            ref = _beam_search_415(lambda ids, m=m, rep=rep: m.text_decoder(ids, None, rep)[:, -1].float(), prompt,
                                   len(img), num_beams, max_length, min_length, repetition_penalty, length_penalty)
        kw = {"method": "beam", "num_beams": num_beams, "max_length": max_length, "min_length": min_length,
              "repetition_penalty": repetition_penalty, "length_penalty": length_penalty}
        got = m.generate(img, prompt, GenerationConfig(**kw, length_rule="official"), image_embeds=emb)
        assert _trim(got) == ref, seed
        other = m.generate(img, prompt, GenerationConfig(**kw, length_rule="transformers"), image_embeds=emb)
        differs += sum(a != b for a, b in zip(_trim(other), ref))
        ends |= {row[-1] == EOS_M for row in ref}
    assert differs > 0, "no caption where the two rules disagree: the comparison proves nothing"
    assert ends == {True, False}, "want captions ended by [SEP] and captions cut at max_length"
