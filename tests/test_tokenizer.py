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


def test_built_vocabulary_is_the_same_in_every_process(tmp_path):
    """The tokenizers trainer broke frequency ties in hash order: two processes built different
    vocabularies from one corpus. build_vocab is a function of the corpus alone."""
    import json
    import os
    import subprocess
    import sys

    from blip.tokenizer import build_vocab

    corpus = CORPUS + ["a small violet hexagon", "three grey stars above a pink cross", "zigzag"]
    script = (f"import json; from blip.tokenizer import build_tokenizer; "
              f"print(json.dumps(build_tokenizer({corpus!r}, vocab_size=60).hf.get_vocab(), sort_keys=True))")
    vocabs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    vocab = json.loads(vocabs[0])
    assert len(vocab) == 60
    # every character alone and as a continuation piece: any caption of these letters tokenises without [UNK]
    assert {"z", "##z", "x", "##x"} <= set(vocab)
    # whole words by frequency, ties by the word: "a" (most frequent), then the 20-times words
    # alphabetically ("blue", "circles", ...); a word seen once ("zigzag") did not make it
    assert {"a", "blue", "circles"} <= set(vocab) and not {"zigzag", "two", "triangle"} & set(vocab)
    assert build_vocab(corpus, 60) == build_vocab(list(reversed(corpus)), 60)


def test_words_left_out_of_a_small_vocabulary_fall_back_to_pieces():
    tok = build_tokenizer(CORPUS + ["hexagon"], vocab_size=40)
    ids = tok(["hexagon"]).input_ids[0].tolist()
    assert tok.hf.unk_token_id not in ids and len(ids) > 3  # [CLS] h ##e ... [SEP]
    assert tok.decode(ids) == "hexagon"
