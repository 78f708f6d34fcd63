"""The transformers export as a user gets it: ``save_hf``'s directory loads with ``AutoProcessor``
and captions through ``pipeline("image-text-to-text")`` with the text of our own ``caption()``.

Tiny random-weight models; the decoder's vocabulary is narrowed to whole words (a trained
captioner's output) and its weights scaled up so that captions depend on the image and beam
search differs from greedy decoding — otherwise an equality of captions could not fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_model import micro_config
from PIL import Image, ImageDraw

from blip.convert import hf_tokenizer, save_hf
from blip.data.transforms import CLIP_STD, EvalTransform, normalize
from blip.model.blip import BlipCaptioner, BlipRetrieval
from blip.model.config import GenerationConfig
from blip.tokenizer import build_tokenizer, load_vocab

CORPUS = ["a picture of a red square left of a blue circle", "a small green triangle right of a big yellow square"] * 5
PROMPT = "a picture of "
SIZE = 32  # micro_config's image size
ONE_GREY_LEVEL = 1 / 255 / min(CLIP_STD)  # one uint8 step after CLIP normalisation (≈ 0.015)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # transformers' generate runs a step at a time; two threads on two shared cores only wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A BERT-format vocab.txt (fixed ids; a trained WordPiece vocabulary's ids vary between
    processes) of the corpus words, some pieces and characters."""
    words = sorted({w for c in CORPUS for w in c.split()} | {"two", "dog", "##s", "c", "##a", "##f", "##e", "!", ","})
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return load_vocab(path)


def _config(tok):
    cfg = micro_config()
    for k, v in tok.special_ids.items():
        setattr(cfg.text, k, v)
    return cfg


def _scale_up_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.std().clamp(min=0.02) if p.numel() > 1 else 0.02
            p.add_(3 * scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def captioner(tok):
    torch.manual_seed(1)
    model = BlipCaptioner(_config(tok))
    _scale_up_(model, seed=1)
    words = [tok.hf.convert_tokens_to_ids(w) for c in CORPUS for w in c.split()]
    assert tok.hf.unk_token_id not in words
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        allowed = torch.full_like(bias, -1e4)
        allowed[words + [tok.sep_token_id]] = 0.0
        bias.add_(allowed)
        bias[tok.sep_token_id] += 0.5  # some captions end before max_length
    return model.eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory, captioner, tok):
    return str(save_hf(captioner, tmp_path_factory.mktemp("hf") / "captioner", kind="captioner", tokenizer=tok))


def _image(i: int) -> Image.Image:
    """Coloured ellipses on a coloured ground, 24..90 px a side: resizing goes up and down."""
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(24, 90)), int(rng.integers(24, 90))
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        box = (x0, y0, x0 + int(rng.integers(6, w)), y0 + int(rng.integers(6, h)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


IMAGES = [_image(i) for i in range(4)]


def _ours(images) -> torch.Tensor:
    return normalize(torch.stack([EvalTransform(SIZE)(im) for im in images]))


def test_auto_processor_reproduces_eval_transform_and_tokenizer(export, tok):
    from transformers import AutoProcessor, BlipProcessor

    ours = _ours(IMAGES)
    exact = AutoProcessor.from_pretrained(export, backend="pil")  # PIL's bicubic, as ours
    assert isinstance(exact, BlipProcessor)
    got = exact(images=IMAGES, return_tensors="pt")["pixel_values"]
    assert got.shape == ours.shape == (len(IMAGES), 3, SIZE, SIZE)
    assert torch.allclose(got, ours, atol=1e-5), (got - ours).abs().max()

    # The default backend (torchvision) resizes uint8 with its own rounding: one grey level at most.
    default = AutoProcessor.from_pretrained(export)
    diff = (default(images=IMAGES, return_tensors="pt")["pixel_values"] - ours).abs()
    assert float(diff.max()) <= ONE_GREY_LEVEL + 1e-5, float(diff.max())

    t = default.tokenizer
    assert t.bos_token_id == tok.bos_token_id and t.pad_token_id == tok.pad_token_id
    assert t.sep_token_id == tok.sep_token_id and t.cls_token_id == tok.cls_token_id
    assert t.convert_tokens_to_ids("[ENC]") == tok.enc_token_id
    for text in [PROMPT, *CORPUS[:2], "Two BIG squares, café!"]:
        assert default(text=text)["input_ids"] == tok.hf(text)["input_ids"], text
    # BLIP's generate writes [DEC] over [CLS] and drops the trailing [SEP]: our prompt ids result
    assert default(text=PROMPT)["input_ids"][:-1] == tok.prompt_ids(PROMPT)


def test_trained_wordpiece_tokenizer_exports_as_bert_tokenizer():
    from transformers import BertTokenizer

    ours = build_tokenizer(CORPUS * 3 + ["two dogs, café!"], vocab_size=120)
    bert = hf_tokenizer(ours, model_max_length=40)
    assert isinstance(bert, BertTokenizer) and bert.model_max_length == 40
    assert bert.bos_token == "[DEC]" and "[ENC]" in bert.all_special_tokens
    for text in [PROMPT, *CORPUS[:2], "Two DOGS, café! 日本 [ENC]", ""]:
        ids = bert(text)["input_ids"]
        assert ids == ours.hf(text)["input_ids"], text
        assert bert.decode(ids, skip_special_tokens=True) == ours.decode(ids), text


def test_tokenizer_bert_cannot_reproduce_is_exported_as_is():
    from tokenizers import normalizers
    from transformers import BertTokenizer

    ours = build_tokenizer(CORPUS * 3, vocab_size=120)
    ours.hf.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)  # a cased tokenizer
    out = hf_tokenizer(ours)
    assert not isinstance(out, BertTokenizer) and out is not ours.hf
    for text in [PROMPT, "A Red Square"]:
        assert out(text)["input_ids"] == ours.hf(text)["input_ids"], text


def test_pipeline_captions_as_our_caption(export, captioner, tok):
    from transformers import AutoProcessor, pipeline
    from transformers import GenerationConfig as HFGenerationConfig

    gen = HFGenerationConfig.from_pretrained(export)
    ref = GenerationConfig()  # caption()'s default: beam search, 3 beams, lengths 5..20 with the prompt
    assert (gen.num_beams, gen.max_length, gen.min_length) == (ref.num_beams, ref.max_length, ref.min_length)
    settings = {"num_beams": gen.num_beams, "max_length": gen.max_length, "min_length": gen.min_length}
    prompts = [PROMPT] * len(IMAGES)
    x = _ours(IMAGES)
    beam = captioner.caption(x, tok, GenerationConfig(method="beam"))
    greedy = captioner.caption(x, tok, GenerationConfig(method="greedy"))
    assert all(beam) and len(set(beam)) > 1 and beam != greedy, (beam, greedy)  # the comparison can fail
    assert any(len(c.split()) < ref.max_length - len(tok.prompt_ids(PROMPT)) for c in beam)  # some end early

    pipe = pipeline(
        "image-text-to-text", model=export, processor=AutoProcessor.from_pretrained(export, backend="pil"),
        **settings,
    )
    out = pipe(images=IMAGES, text=prompts, return_full_text=False)
    assert [o["generated_text"].strip() for o in out] == beam
    out = pipe(images=IMAGES, text=prompts, return_full_text=False, generate_kwargs={"num_beams": 1})
    assert [o["generated_text"].strip() for o in out] == greedy

    # The default processor (torchvision backend): our captions of the pixels it computes.
    plain = pipeline("image-text-to-text", model=export)
    pixels = plain.processor(images=IMAGES, return_tensors="pt")["pixel_values"]
    out = plain(images=IMAGES, text=prompts, return_full_text=False, generate_kwargs=settings)
    assert [o["generated_text"].strip() for o in out] == captioner.caption(pixels, tok, ref)


def test_retrieval_export_loads_its_processor(tmp_path, tok):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    torch.manual_seed(2)
    ret = BlipRetrieval(_config(tok))
    _scale_up_(ret, seed=2)
    ret.eval()
    d = str(save_hf(ret, tmp_path / "retrieval", kind="retrieval", tokenizer=tok))
    proc = AutoProcessor.from_pretrained(d, backend="pil")
    hf = BlipForImageTextRetrieval.from_pretrained(d).eval()
    images, texts = IMAGES[:3], [*CORPUS[:2], "a red circle"]
    inputs = proc(images=images, text=texts, padding=True, return_tensors="pt")
    assert torch.allclose(inputs["pixel_values"], _ours(images), atol=1e-5)
    batch = tok(texts)
    assert torch.equal(inputs["input_ids"], batch.input_ids)
    enc_ids = inputs["input_ids"].clone()
    enc_ids[:, 0] = tok.enc_token_id  # transformers' ITM does not put [ENC] at position 0 itself
    with torch.no_grad():
        emb = ret.encode_image(_ours(images))
        itm = hf(
            input_ids=enc_ids, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"]
        ).itm_score
        itc = hf(**inputs, use_itm_head=False).itm_score
        ours_itm = ret.itm_logits(emb, batch.input_ids, batch.attention_mask)
        ours_itc = ret.image_features(emb) @ ret.text_features(batch.input_ids, batch.attention_mask).T
    assert torch.allclose(itm, ours_itm, atol=1e-4), (itm - ours_itm).abs().max()
    assert torch.allclose(itc, ours_itc, atol=1e-4), (itc - ours_itc).abs().max()
