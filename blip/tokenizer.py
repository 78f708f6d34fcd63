"""BERT WordPiece tokenizer with BLIP's two added tokens, [DEC] (bos) and [ENC].

Two ways to get one, never a download:

* :func:`build_tokenizer` builds a WordPiece vocabulary from a caption corpus, deterministically
  (the default, offline path);
* :func:`load_vocab` reads a ``vocab.txt`` the user has (e.g. bert-base-uncased's), giving the
  official ids: [PAD] 0, [CLS] 101, [SEP] 102, [DEC] 30522, [ENC] 30523.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, T) long, [CLS] ... [SEP], right padded
    attention_mask: torch.Tensor  # (B, T) long, 1 = token


class BlipTokenizer:
    """Thin wrapper over a ``transformers`` fast tokenizer exposing BLIP's special ids."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        vocab = self.hf.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t != "[MASK]" and t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; build it with blip.tokenizer")
        self.pad_token_id = vocab["[PAD]"]
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = vocab["[SEP]"]
        self.bos_token_id = vocab["[DEC]"]
        self.enc_token_id = vocab["[ENC]"]
        if len(self) < 10:
            # The silent failure mode of from_pretrained("bert-base-uncased") offline (environment.md §3).
            raise ValueError(f"tokenizer has only {len(self)} tokens: the vocabulary did not load")

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids to copy into ``TextConfig`` (and ``vocab_size``)."""
        return {
            "vocab_size": len(self),
            "pad_token_id": self.pad_token_id,
            "cls_token_id": self.cls_token_id,
            "sep_token_id": self.sep_token_id,
            "bos_token_id": self.bos_token_id,
            "enc_token_id": self.enc_token_id,
        }

    def __call__(self, texts: list[str], max_length: int = 30, padding: str = "longest") -> TextBatch:
        """Tokenise to ``[CLS] text [SEP]``, truncated at ``max_length`` tokens, right padded."""
        enc = self.hf(
            list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt",
            return_token_type_ids=False,
        )
        return TextBatch(enc["input_ids"], enc["attention_mask"])

    def prompt_ids(self, prompt: str) -> list[int]:
        """Ids of ``[CLS] prompt`` without [SEP]; its length is BLIP's ``prompt_length``."""
        return self.hf(prompt, add_special_tokens=True)["input_ids"][:-1]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True).strip()

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.hf.batch_decode(ids, skip_special_tokens=True)]

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | Path) -> "BlipTokenizer":
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {directory}; build one with blip.tokenizer.build_tokenizer")
        return cls(PreTrainedTokenizerFast.from_pretrained(str(directory)))


def build_vocab(corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> dict[str, int]:
    """A WordPiece vocabulary of ``corpus``, deterministically: the special tokens, every character
    (alone and as ``##c``), then whole words by frequency (ties by the word itself) up to
    ``vocab_size``; words seen fewer than ``min_frequency`` times are left to the characters.

    The ``tokenizers`` trainer breaks frequency ties in hash order, so two processes built
    different vocabularies from the same captions (and the same model trained to different
    numbers); this vocabulary is a function of the corpus alone.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in chars + [f"##{c}" for c in chars]:
        vocab.setdefault(piece, len(vocab))
    for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size or n < min_frequency:
            break
        vocab.setdefault(w, len(vocab))
    return vocab


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> BlipTokenizer:
    """A lower-cased BERT WordPiece tokenizer with :func:`build_vocab`'s vocabulary of ``corpus``
    (offline, deterministic, seconds).

    The vocabulary may be smaller than ``vocab_size`` on a small corpus; use ``len(tokenizer)``
    for the model's ``text.vocab_size``.
    """
    return _from_vocab(build_vocab(corpus, vocab_size, min_frequency))


def load_vocab(vocab_file: str | Path) -> BlipTokenizer:
    """Tokenizer from a BERT ``vocab.txt``, with [DEC] and [ENC] appended as in ``init_tokenizer``."""
    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"vocabulary file {vocab_file} not found (expected a BERT vocab.txt)")
    vocab: dict[str, int] = {}
    for i, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\n"), i)
    for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if t not in vocab:
            raise ValueError(f"{vocab_file} has no {t} entry; is it a BERT vocab.txt?")
    for t in ("[DEC]", "[ENC]"):  # bos 30522, enc 30523 for bert-base-uncased
        vocab.setdefault(t, len(vocab))
    return _from_vocab(vocab)


def _from_vocab(vocab: dict[str, int]) -> BlipTokenizer:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    _finish(tok)
    return BlipTokenizer(_wrap(PreTrainedTokenizerFast, tok))


def _finish(tok) -> None:
    """[CLS] $A [SEP] template, WordPiece decoder, specials marked special (skipped on decode)."""
    from tokenizers import AddedToken, decoders, processors

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])


def _wrap(cls, tok):
    return cls(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]" if tok.token_to_id("[MASK]") is not None else None,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
    )
