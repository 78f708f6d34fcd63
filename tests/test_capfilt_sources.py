"""Released checkpoints as CapFilt's captioner and filter: ours, the official .pth layout, transformers."""

from __future__ import annotations

import pytest
import torch

from blip.capfilt.models import InferenceModel, model_fingerprint
from blip.capfilt.sources import kind_of, load_source
from blip.model.blip import BlipCaptioner, BlipRetrieval
from blip.model.config import load_preset
from blip.model.scoring import image_embeddings, itm_scores
from blip.tokenizer import build_tokenizer

CORPUS = ["a red circle on a blue square", "two green stars", "a picture of a yellow triangle"] * 20


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, vocab_size=120)


def _cfg(tok):
    # heads of 64 dims, as in every BLIP checkpoint: the official layout's shapes then give the config
    return load_preset("tiny", vision={"heads": 2}, text={"num_attention_heads": 2, **tok.special_ids}, queue_size=64)


def _vocab_txt(tok, path):
    vocab = tok.hf.get_vocab()
    path.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    return path


def _perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def _same_weights(loaded, original):
    theirs = original.state_dict()
    for k, v in loaded.state_dict().items():
        if "_m." in k or "queue" in k or k == "temp":
            continue  # momentum towers restart as copies; queues and ITC's temperature: training state
        assert torch.equal(v, theirs[k]), k


def _itm(model, tok, images):
    emb, _ = image_embeddings(model, images)
    t = tok(["a red circle", "two green stars"], max_length=20)
    return itm_scores(model, emb, t.input_ids, t.attention_mask).prob


def test_an_official_pth_pair_loads_as_captioner_and_filter(tmp_path, tok):
    cfg = _cfg(tok)
    cap, ret = _perturbed(BlipCaptioner(cfg)), _perturbed(BlipRetrieval(cfg))
    torch.save({"model": cap.state_dict()}, tmp_path / "model_base_caption_capfilt_large.pth")
    torch.save({"model": ret.state_dict()}, tmp_path / "model_base_retrieval_coco.pth")
    vocab = _vocab_txt(tok, tmp_path / "vocab.txt")

    c = load_source(tmp_path / "model_base_caption_capfilt_large.pth", "captioner", vocab)
    f = load_source(tmp_path / "model_base_retrieval_coco.pth", "filter", vocab)
    assert (c.kind, f.kind) == ("official", "official")
    assert c.model.cfg.vision == cfg.vision and f.model.cfg.text.num_hidden_layers == cfg.text.num_hidden_layers
    _same_weights(c.model, cap)
    _same_weights(f.model, ret)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(_itm(f.model, f.tokenizer, images), _itm(ret, tok, images), atol=1e-6)
    assert c.tokenizer.bos_token_id == tok.bos_token_id and len(c.tokenizer) == len(tok)

    with pytest.raises(ValueError, match=r"model_base_retrieval_coco\.pth has no text_decoder.*captioner"):
        load_source(tmp_path / "model_base_retrieval_coco.pth", "captioner", vocab)
    with pytest.raises(ValueError, match="model.vocab_file"):
        load_source(tmp_path / "model_base_retrieval_coco.pth", "filter")
    a = model_fingerprint(tmp_path / "model_base_retrieval_coco.pth", vocab)
    vocab.write_text(vocab.read_text() + "extra\n")
    assert model_fingerprint(tmp_path / "model_base_retrieval_coco.pth", vocab) != a  # the vocabulary counts


def test_a_transformers_folder_loads_as_captioner_and_filter(tmp_path, tok):
    from blip.convert import save_hf

    cfg = _cfg(tok)
    cap, ret = _perturbed(BlipCaptioner(cfg)), _perturbed(BlipRetrieval(cfg))
    save_hf(cap, tmp_path / "blip-image-captioning", kind="captioner", tokenizer=tok)
    save_hf(ret, tmp_path / "blip-itm-coco", kind="retrieval", tokenizer=tok)
    c = load_source(tmp_path / "blip-image-captioning", "captioner")
    f = load_source(tmp_path / "blip-itm-coco", "filter")
    assert (c.kind, f.kind) == ("transformers", "transformers")
    _same_weights(c.model, cap)
    _same_weights(f.model, ret)
    assert c.tokenizer("a red circle").input_ids.tolist() == tok("a red circle").input_ids.tolist()
    m = InferenceModel(tmp_path / "blip-itm-coco", "filter", "cpu")
    assert m.kind == "transformers" and m.image_size == 64
    with pytest.raises(ValueError, match="BlipForImageTextRetrieval"):
        load_source(tmp_path / "blip-image-captioning", "filter")


def test_sources_that_are_not_there_or_not_blip_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        kind_of("Salesforce/blip-itm-base-coco")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="official BLIP .pth"):
        kind_of(tmp_path / "weights.npz")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="neither our checkpoint"):
        kind_of(tmp_path / "other")
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"broken\.pth: not a readable BLIP checkpoint"):
        from blip.tokenizer import build_tokenizer as bt

        vocab = tmp_path / "vocab.txt"
        v = bt(CORPUS, vocab_size=60).hf.get_vocab()
        vocab.write_text("\n".join(sorted(v, key=v.get)))
        load_source(tmp_path / "broken.pth", "filter", vocab)
