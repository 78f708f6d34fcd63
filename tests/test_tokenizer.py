"""Tokenizer: offline WordPiece with [DEC]/[ENC], BERT vocab.txt loading, prompt length."""

from __future__ import annotations

import pytest

from blip.tokenizer import BlipTokenizer, build_tokenizer, load_vocab

CORPUS = ["a red square on the left", "two blue circles next to a green triangle", "a picture of a dog"] * 20


def test_built_tokenizer_has_blip_specials_and_round_trips(tmp_path):
    tok = build_tokenizer(CORPUS, vocab_size=120)
    assert {"[PAD]", "[CLS]", "[SEP]", "[DEC]", "[ENC]"} <= set(tok.hf.get_vocab())
    b = tok(["a red square", "two blue circles next to a green triangle"], max_length=8)
    assert b.input_ids[0, 0] == tok.cls_token_id and b.input_ids[0, 4] == tok.sep_token_id
    assert b.input_ids.shape[1] == 8 and b.attention_mask[0].tolist() == [1] * 5 + [0] * 3
    assert b.input_ids[1, -1] == tok.sep_token_id  # truncated, still ends with [SEP]
    assert tok.decode(b.input_ids[0]) == "a red square"
    tok.save(tmp_path / "tok")
    again = BlipTokenizer.load(tmp_path / "tok")
    assert again(["a dog"]).input_ids.tolist() == tok(["a dog"]).input_ids.tolist()
    assert again.special_ids == tok.special_ids


def test_prompt_length_is_cls_plus_prompt_words():
    tok = build_tokenizer(CORPUS, vocab_size=120)
    ids = tok.prompt_ids("a picture of ")
    assert len(ids) == 4 and ids[0] == tok.cls_token_id  # BLIP's prompt_length = 4


def test_bert_vocab_file_gives_official_ids(tmp_path):
    # A stand-in written in bert-base-uncased's format: 30522 lines, specials at 0/100/101/102/103.
    words = [f"[unused{i}]" for i in range(30522)]
    words[0], words[100], words[101], words[102], words[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    for i, w in enumerate(["a", "picture", "of", "dog", "##s", "woman"]):
        words[1037 + i] = w
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = load_vocab(tmp_path / "vocab.txt")
    assert (tok.bos_token_id, tok.enc_token_id, tok.pad_token_id, tok.sep_token_id) == (30522, 30523, 0, 102)
    assert len(tok) == 30524
    assert tok(["a picture of dogs"]).input_ids[0].tolist() == [101, 1037, 1038, 1039, 1040, 1041, 102]


def test_missing_vocab_file_and_empty_tokenizer_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab"):
        load_vocab(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BlipTokenizer.load(tmp_path)
