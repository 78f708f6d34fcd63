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
    got = ours.generate(img, prompt, GenerationConfig(method=method, num_beams=num_beams, max_length=16, min_length=6))
    assert got[:, 0].eq(ours.cfg.text.bos_token_id).all()
    assert _trim(got, 3) == _trim(ref, 3)


def test_generated_ids_match_with_repetition_penalty(captioner_pair):
    ours, hf = captioner_pair
    img = _images(2, 5)
    prompt = [2, 10, 11, 12]
    ref = _hf_generate(hf, img, prompt, max_length=14, min_length=5, num_beams=3, repetition_penalty=1.1)
    got = ours.generate(
        img, prompt, GenerationConfig(method="beam", max_length=14, min_length=5, repetition_penalty=1.1)
    )
    assert _trim(got, 3) == _trim(ref, 3)


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
    got = ours.generate(img, prompt, GenerationConfig(method=method, num_beams=num_beams, max_length=16, min_length=5))
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
