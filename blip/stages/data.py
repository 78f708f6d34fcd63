"""Stages ``data`` (generate the embedded world) and ``tokenizer`` (WordPiece on the captions)."""

from __future__ import annotations

from pathlib import Path

from ..params import Params
from ..track import Tracker
from .common import datasets


def data(stage, params: Params, tracker: Tracker, *, out: str) -> dict:
    from ..data.generator import generate

    manifest = generate(params.generate, out, progress=False)
    counts = {f"data/{split}/{k}": float(v[k]) for split, v in manifest["splits"].items() for k in ("images", "pairs")
              if k in v}
    if "noise_summary" in manifest:
        counts["data/web/noise_rate"] = float(manifest["noise_summary"]["rate"])
    tracker.log_metrics(counts)
    tracker.log_datasets(datasets([str(Path(out) / s) for s in manifest["splits"]], "output"))
    return counts


def tokenizer(stage, params: Params, tracker: Tracker, *, shards: list[str], out: str) -> dict:
    from ..data.corpus import caption_corpus
    from ..tokenizer import build_tokenizer, load_vocab

    mp = params.model
    tok = load_vocab(mp.vocab_file) if mp.vocab_file else build_tokenizer(caption_corpus(shards), mp.vocab_size)
    tok.save(out)
    tracker.log_metrics({"tokenizer/size": float(len(tok))})
    tracker.log_datasets(datasets(shards, "input"))
    print(f"tokenizer with {len(tok)} tokens -> {out}")
    return {"tokens": len(tok)}
