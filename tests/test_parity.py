"""Parity with the installed transformers BLIP classes, weights copied through our converters.

Tiny random configs (blip-facts §3.4: heads, vision eps and label smoothing set explicitly);
float32; everything must agree within 1e-5 and generated ids must be identical.
"""

from __future__ import annotations

import pytest
import torch
from helpers_model import micro_config, perturb_, text_inputs

from blip.convert import (
    from_hf_captioner,
    from_hf_retrieval,
    to_hf_captioner,
    to_hf_retrieval,
)
from blip.model import losses
from blip.model.blip import BlipCaptioner, BlipRetrieval
from blip.model.config import GenerationConfig

ATOL = 1e-5


@pytest.fixture(scope="module")
def captioner_pair():
    torch.manual_seed(0)
    ours = perturb_(BlipCaptioner(micro_config())).eval()
    return ours, to_hf_captioner(ours)


@pytest.fixture(scope="module")
def retrieval_pair():
    torch.manual_seed(1)
    ours = perturb_(BlipRetrieval(micro_config())).eval()
    return ours, to_hf_retrieval(ours)


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_decoder_logits_and_loss_match(captioner_pair):
    ours, hf = captioner_pair
    img = _images(4)
    ids, mask = text_inputs(4, 12)
    ids[:, 0] = ours.cfg.text.bos_token_id  # transformers' forward does not set [DEC] itself (§3.4.3)
    labels = losses.lm_labels(ids, mask, prompt_length=4)
    with torch.no_grad():
        ref = hf(pixel_values=img, input_ids=ids, attention_mask=mask, labels=labels)
        logits = ours.text_decoder(ids, mask, ours.encode_image(img))
        loss = ours(img, ids, mask, prompt_length=4)["lm"]
    assert torch.allclose(logits, ref.logits, atol=ATOL), (logits - ref.logits).abs().max()
    assert abs(float(loss) - float(ref.loss)) < ATOL


def _hf_generate(hf, img, prompt, **kw):
    # transformers' BLIP generate drops the last prompt token (it expects [BOS, SEP]): add one.
    ids = torch.tensor([prompt + [3]] * img.shape[0])
    return hf.generate(pixel_values=img, input_ids=ids, **kw)


def _trim(seqs: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos, 4) + 1] if eos in row[4:] else row)
    return out


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_ids_match(captioner_pair, num_beams, seed):
    ours, hf = captioner_pair
    img = _images(3, seed)
    prompt = [2, 10, 11, 12]  # [CLS] a picture of
    kw = dict(max_length=16, min_length=6, num_beams=num_beams, do_sample=False)
    ref = _hf_generate(hf, img, prompt, **kw)
    method = "beam" if num_beams > 1 else "greedy"
    cfg = GenerationConfig(method=method, num_beams=num_beams, max_length=16, min_length=6, length_rule="transformers")
    got = ours.generate(img, prompt, cfg)
    assert got[:, 0].eq(ours.cfg.text.bos_token_id).all()
    assert _trim(got, 3) == _trim(ref, 3)


def test_generated_ids_match_with_repetition_penalty(captioner_pair):
    ours, hf = captioner_pair
    img = _images(2, 5)
    prompt = [2, 10, 11, 12]
    ref = _hf_generate(hf, img, prompt, max_length=14, min_length=5, num_beams=3, repetition_penalty=1.1)
    got = ours.generate(
        img, prompt,
        GenerationConfig(method="beam", max_length=14, min_length=5, repetition_penalty=1.1, length_rule="transformers"),
    )
    assert _trim(got, 3) == _trim(ref, 3)


def test_nucleus_sampling_steps_match_transformers_sampling(captioner_pair):
    # transformers draws its own tokens; along the sequence it drew, every step's distribution
    # (repetition penalty, min length, then its default top_k=50 and top_p) must be ours.
    from blip.model.generation import _repetition_penalty, nucleus_distribution

    ours, hf = captioner_pair
    img = _images(4, 7)
    prompt, eos = [2, 10, 11, 12], 3
    torch.manual_seed(0)
    out = _hf_generate(hf, img, prompt, do_sample=True, top_p=0.9, repetition_penalty=1.1, max_length=16,
                       min_length=6, output_scores=True, return_dict_in_generate=True)
    seqs, P = out.sequences, len(prompt)
    cfg = GenerationConfig.nucleus(max_length=16, min_length=6)
    with torch.no_grad():
        logits = ours.text_decoder(seqs, None, ours.encode_image(img))
    top_k_cut = 0
    for cur in range(P, seqs.shape[1]):
        live = ~(seqs[:, P:cur] == eos).any(1)  # rows still generating
        scores = _repetition_penalty(logits[:, cur - 1].float(), seqs[:, :cur], cfg.repetition_penalty)
        if cur < cfg.min_length:
            scores[:, eos] = float("-inf")
        got = nucleus_distribution(scores, cfg.top_k, cfg.top_p)[live]
        ref = out.scores[cur - P].softmax(-1)[live]
        assert torch.equal(got > 0, ref > 0), cur
        assert torch.allclose(got, ref, atol=1e-5), (cur, (got - ref).abs().max())
        assert (got.gather(1, seqs[live, cur : cur + 1]) > 0).all()
        top_k_cut += int(((nucleus_distribution(scores, 0, cfg.top_p) > 0).sum(-1) > cfg.top_k).sum())
    assert top_k_cut > 0, "top-p alone never kept more than 50 tokens: top_k was not tested"


def test_itm_logits_and_itc_similarities_match(retrieval_pair):
    ours, hf = retrieval_pair
    img = _images(4, 3)
    ids, mask = text_inputs(4, 10, seed=3)
    enc_ids = ids.clone()
    enc_ids[:, 0] = ours.cfg.text.enc_token_id  # official ITM puts [ENC] at position 0 (§3.4.2)
    with torch.no_grad():
        ref_itm = hf(input_ids=enc_ids, pixel_values=img, attention_mask=mask, use_itm_head=True).itm_score
        ref_itc = hf(input_ids=ids, pixel_values=img, attention_mask=mask, use_itm_head=False).itm_score
        emb = ours.encode_image(img)
        itm = ours.itm_logits(emb, ids, mask)
        itc = ours.image_features(emb) @ ours.text_features(ids, mask).T
    assert torch.allclose(itm, ref_itm, atol=ATOL), (itm - ref_itm).abs().max()
    assert torch.allclose(itc, ref_itc, atol=ATOL), (itc - ref_itc).abs().max()


def test_round_trip_through_transformers_is_exact(captioner_pair, retrieval_pair):
    for ours, hf, back in [
        (*captioner_pair, from_hf_captioner),
        (*retrieval_pair, from_hf_retrieval),
    ]:
        again = back(hf)
        a, b = ours.state_dict(), again.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            if any(s in k for s in ("_m.", "queue", "ptr", "temp")):
                continue  # training-only state transformers does not carry
            assert torch.equal(a[k], b[k]), k
        # the momentum encoders restart as copies of the loaded towers
        if hasattr(again, "visual_encoder_m"):
            assert torch.equal(again.visual_encoder_m.pos_embed, again.visual_encoder.pos_embed)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_ids_match_when_captions_end_at_different_steps(num_beams):
    # Stronger image conditioning and a likelier [SEP]: rows finish at different steps, which
    # exercises dropping finished rows (greedy) and finished hypotheses (beam).
    torch.manual_seed(0)
    ours = perturb_(BlipCaptioner(micro_config())).eval()
    with torch.no_grad():
        for layer in ours.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(20)
        ours.text_decoder.cls.predictions.bias[3] = 0.3
    hf = to_hf_captioner(ours)
    img = 3 * _images(8, 1)
    prompt = [2, 10, 11, 12]
    ref = _hf_generate(hf, img, prompt, max_length=16, min_length=5, num_beams=num_beams)
    method = "beam" if num_beams > 1 else "greedy"
    cfg = GenerationConfig(method=method, num_beams=num_beams, max_length=16, min_length=5, length_rule="transformers")
    got = ours.generate(img, prompt, cfg)
    ends = {row.index(3) for row in _trim(got, 3)}
    assert len(ends) > 1, "test needs captions of different lengths"
    assert _trim(got, 3) == _trim(ref, 3)


def test_saved_transformers_format_loads_with_transformers(tmp_path, captioner_pair, retrieval_pair):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from blip.convert import save_hf

    ours, _ = captioner_pair
    save_hf(ours, tmp_path / "cap", kind="captioner")
    hf = BlipForConditionalGeneration.from_pretrained(str(tmp_path / "cap")).eval()
    img = _images(2, 9)
    ids, mask = text_inputs(2, 8)
    ids[:, 0] = ours.cfg.text.bos_token_id
    with torch.no_grad():
        ref = hf(pixel_values=img, input_ids=ids, attention_mask=mask).logits
        got = ours.text_decoder(ids, mask, ours.encode_image(img))
    assert torch.allclose(got, ref, atol=ATOL)
    ret, _ = retrieval_pair
    save_hf(ret, tmp_path / "ret", kind="retrieval")
    hf = BlipForImageTextRetrieval.from_pretrained(str(tmp_path / "ret")).eval()
    ids[:, 0] = ret.cfg.text.enc_token_id
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=img, attention_mask=mask).itm_score
        got = ret.itm_logits(ret.encode_image(img), ids, mask)
    assert torch.allclose(got, ref, atol=ATOL)
