"""Price a run before starting it: ``python -m blip plan``.

For the current ``params.yaml`` (plus ``--variant`` / ``--set``), one row per stage of the bootstrap
loop: the samples it reads, its optimizer steps (training stages), the FLOPs it will spend and the
GPU-hours that takes at a stated model-FLOPs utilisation (MFU) of a stated peak::

    python -m blip plan                                    # the embedded run
    python -m blip plan --variant paper --samples web=14000000 human=567000
    python -m blip plan --variant paper --peak-tflops 989 --mfu 0.4   # H100 SXM bf16 dense, 40%

FLOPs are counted analytically from the model's shapes (matmuls and attention, 2 FLOPs per
multiply-add; a backward pass costs twice its forward; momentum encoders run forward only), per
job as BLIP computes it: pre-training = ViT + unimodal text (ITC) + three image-grounded text
passes (ITM: the positive and two hard negatives) + the decoder (LM), plus the momentum ViT and
text encoder; fine-tuning the captioner = ViT + decoder; the filter/retrieval model = pre-training
without the decoder. ``tests/test_plan.py`` holds the formulas to ``torch.utils.flop_counter`` on a
real model. Elementwise work, the data loader and evaluation's CPU side are not counted — they
are what MFU absorbs.

Samples come from, in order: ``--samples split=N`` (``web``, ``human``, ``test``, ``zeroshot``),
the shard folders (img2dataset's ``*_stats.json``, ``successes``; ``pairs`` where our generator
wrote it; else the tars are read), or — for the generated world before it exists — the ``generate`` section.
The re-pre-training set is not known before the filter has run; the plan prices its upper bound
(every web text and every synthetic caption kept) and says so.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .model.config import BlipConfig, TextConfig, VisionConfig

#: the splits a run reads: pre-training (web), fine-tuning (human), evaluation (test, zeroshot)
SPLITS = ("web", "human", "test", "zeroshot")
CAPTIONS_PER_IMAGE = 5  # COCO's and our generator's; the evaluation splits' texts per image
PROMPT_TOKENS = 5  # "[DEC] a picture of": the caption prompt's length in BLIP's BERT vocabulary


# --------------------------------------------------------------------------- FLOPs per sample
def vit_flops(v: VisionConfig) -> float:
    """Forward FLOPs of the ViT for one image: patch embedding + ``depth`` blocks (MLP ratio 4)."""
    n = (v.image_size // v.patch_size) ** 2 + 1
    d = v.width
    per_block = 2 * (12 * n * d * d) + 2 * (2 * n * n * d)  # qkv+proj+mlp, scores+weighted sum
    return 2 * (n - 1) * 3 * v.patch_size ** 2 * d + v.depth * per_block


def image_tokens(v: VisionConfig) -> int:
    return (v.image_size // v.patch_size) ** 2 + 1


def _text_layer(t: TextConfig, tokens: int, queries: int, image: VisionConfig | None, cross_kv: bool) -> float:
    """MACs of one text layer: keys/values of ``tokens``, queries (and everything after) of ``queries``."""
    h, i = t.hidden_size, t.intermediate_size
    macs = 2 * tokens * h * h + 2 * queries * h * h + 2 * queries * i * h + 2 * queries * tokens * h
    if image is not None:
        n = image_tokens(image)
        macs += 2 * queries * h * h + 2 * queries * n * h  # q, out; scores, weighted sum
        if cross_kv:
            macs += 2 * n * image.width * h
    return macs


def text_flops(t: TextConfig, tokens: int, image: VisionConfig | None = None, lm_head: bool = False,
               first_only: bool = False, cross_kv: bool = True) -> float:
    """Forward FLOPs of the text transformer on ``tokens`` tokens: self-attention + FFN per layer,
    cross-attention to the image's tokens when ``image`` is given (``cross_kv``: including the
    keys/values projection of the image tokens), the LM head when ``lm_head``. ``first_only``:
    only position 0 is read (ITC features, the ITM head), so the last layer computes its query,
    attention output and FFN for that position alone (``TextTransformer(first_only=True)``)."""
    layers = t.num_hidden_layers
    macs = (layers - 1) * _text_layer(t, tokens, tokens, image, cross_kv)
    macs += _text_layer(t, tokens, 1 if first_only else tokens, image, cross_kv)
    if lm_head:
        macs += tokens * (t.hidden_size * t.hidden_size + t.hidden_size * t.vocab_size)
    return 2 * macs


def cross_kv_flops(t: TextConfig, v: VisionConfig) -> float:
    """Every text layer's cross-attention keys and values of one image's tokens."""
    return 2 * t.num_hidden_layers * 2 * image_tokens(v) * v.width * t.hidden_size


@dataclass(frozen=True)
class JobFlops:
    """FLOPs of one training sample of a job: ``forward`` (with gradients), ``momentum`` (forward only)."""

    forward: float
    momentum: float = 0.0

    @property
    def train(self) -> float:
        return 3 * self.forward + self.momentum


def job_flops(job: str, cfg: BlipConfig, text_len: int) -> JobFlops:
    """Per-sample training FLOPs of ``job`` (``pretrain``, ``captioner``, ``retrieval``, ``shared``)
    with texts of ``text_len`` tokens (the section's ``max_text_len``: an upper bound)."""
    v, t = cfg.vision, cfg.text
    vit, uni = vit_flops(v), text_flops(t, text_len, first_only=True)  # ITC reads [CLS]
    # ITM: the positive, a hard negative text and a hard negative image (another image of the batch),
    # cross-attention keys/values projected once per image (TextTransformer's image_index)
    itm = 3 * text_flops(t, text_len, v, first_only=True, cross_kv=False) + cross_kv_flops(t, v)
    dec = text_flops(t, text_len, v, lm_head=True)
    if job == "captioner":
        return JobFlops(vit + dec)
    if job == "retrieval":
        return JobFlops(vit + uni + itm, momentum=vit + uni)
    if job in ("pretrain", "shared"):
        return JobFlops(vit + uni + itm + dec, momentum=vit + uni)
    raise ValueError(f"unknown job {job!r}: pretrain | captioner | retrieval | shared")


def caption_flops(cfg: BlipConfig, max_length: int, beams: int) -> float:
    """One image captioned: the ViT once, then ``max_length`` decoding steps for ``beams``
    sequences (nucleus: 1), each step one token through the decoder with its KV cache (attention
    to the cached tokens counted at full length: an upper bound)."""
    v, t = cfg.vision, cfg.text
    h, i, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    n, length = image_tokens(v), PROMPT_TOKENS + max_length
    step = L * (2 * (4 * h * h + 2 * i * h + 2 * h * h) + 2 * (2 * length * h + 2 * n * h)) + 2 * (h * h + h * t.vocab_size)
    return vit_flops(v) + cross_kv_flops(t, v) + beams * length * step  # keys/values once per image


def filter_flops(cfg: BlipConfig, text_len: int, texts: int) -> float:
    """One image's ``texts`` texts scored: ViT once, per text the unimodal pass (ITC) and one
    image-grounded pass (ITM)."""
    v, t = cfg.vision, cfg.text
    return vit_flops(v) + cross_kv_flops(t, v) + texts * (text_flops(t, text_len, first_only=True)
                                                          + text_flops(t, text_len, v, first_only=True, cross_kv=False))


def retrieval_eval_flops(cfg: BlipConfig, images: int, texts: int, k: int, text_len: int) -> float:
    """BLIP's retrieval evaluation of one split: ITC features of every image and text, then ITM on
    the top ``k`` candidates of every image and every text."""
    v, t = cfg.vision, cfg.text
    itm = text_flops(t, text_len, v, first_only=True)
    return (images * vit_flops(v) + texts * text_flops(t, text_len, first_only=True)
            + (images + texts) * min(k, texts) * itm)


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Count:
    images: int
    pairs: int
    source: str


def count_folder(folder: str) -> Count | None:
    """Images and pairs of a shard folder (img2dataset ``*_stats.json``, our ``sizes.json``, else
    the tars themselves: ``blip.data.shards.count_shards``), or None when it holds no shards."""
    from .data.shards import count_shards, resolve_shards

    if not Path(folder).is_dir() or not any(Path(folder).glob("*.tar")):
        return None
    found = count_shards(resolve_shards([folder])).values()
    return Count(sum(c.samples for c in found), sum(c.pairs for c in found), f"{len(found)} shards in {folder}")


def split_folder(params, split: str) -> str:
    return params.data.web if split == "web" else f"{params.data.root}/{split}"


def counts(params, given: dict[str, int]) -> dict[str, Count]:
    """Per split: ``given`` (images; pairs = images, or x5 for the human and evaluation splits),
    else the folder's stats files, else the generate section."""
    out = {}
    for split in SPLITS:
        per_image = 1 if split == "web" else CAPTIONS_PER_IMAGE
        if split in given:
            out[split] = Count(given[split], given[split] * per_image, "--samples")
            continue
        found = count_folder(split_folder(params, split))
        if found is not None:
            out[split] = found
        elif Path(params.data.root).as_posix().rstrip("/").endswith("generated"):
            g = params.generate
            out[split] = Count(getattr(g, split), getattr(g, split) * (1 if split == "web" else g.captions_per_image),
                               "generate section")
        else:
            raise ValueError(f"no count for split {split!r}: {split_folder(params, split)} has no *_stats.json; "
                             f"pass --samples {split}=N")
    return out


# --------------------------------------------------------------------------- the plan
@dataclass
class Row:
    stage: str
    samples: int
    steps: int | None
    flops: float
    note: str = ""


def _steps(cfg, pairs: int) -> int:
    per_epoch = -(-pairs // cfg.batch_size)  # the loader keeps the last, partial batch (BlipLoader.__len__)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def plan(params, given: dict[str, int] | None = None) -> tuple[list[Row], dict[str, Count]]:
    """The rows of the plan for ``params`` (a ``blip.params.Params``) and the counts they use."""
    n = counts(params, given or {})
    vocab = params.model.vocab_size
    if params.model.vocab_file is not None and Path(params.model.vocab_file).is_file():
        vocab = sum(1 for line in open(params.model.vocab_file, encoding="utf-8") if line.strip())
    cfg = params.model.config({"vocab_size": vocab})
    rows: list[Row] = []

    def at(section: str) -> BlipConfig:
        """The model as a training section runs it (its ``image_size``, e.g. 384-px fine-tuning);
        what a fine-tuned model is later used for runs at that size too."""
        size = params.train(section).image_size
        return cfg if size is None else replace(cfg, vision=replace(cfg.vision, image_size=size))

    def train_row(stage: str, section: str, pairs: int, note: str = "") -> None:
        tc = params.train(section)
        job = {"pretrain": "pretrain", "repretrain": "pretrain", "finetune_captioner": "captioner",
               "finetune_filter": "retrieval", "finetune_shared": "shared"}[section]
        steps = _steps(tc, pairs)
        note = f"{note}; {at(section).vision.image_size} px" if note else f"{at(section).vision.image_size} px"
        rows.append(Row(stage, pairs, steps, steps * tc.batch_size * job_flops(job, at(section), tc.max_text_len).train,
                        note))

    web, human = n["web"], n["human"]
    ws = params.warmstart_vision
    if ws.enabled:
        steps = ((ws.images - ws.held_out) // ws.batch_size) * ws.epochs  # drops the partial batch
        rows.append(Row("warmstart_vision", ws.images, steps, steps * ws.batch_size * 3 * vit_flops(cfg.vision)))
    wt = params.warmstart_text
    if wt.enabled:
        steps = ((wt.captions - wt.held_out) // wt.batch_size) * wt.epochs
        rows.append(Row("warmstart_text", wt.captions, steps,
                        steps * wt.batch_size * 3 * text_flops(cfg.text, wt.max_text_len, lm_head=True)))
    train_row("pretrain", "pretrain", web.pairs + human.pairs)
    shared = params.capfilt.models == "shared"
    if shared:
        train_row("finetune_shared", "finetune_shared", human.pairs)
    else:
        train_row("finetune_captioner", "finetune_captioner", human.pairs)
        train_row("finetune_filter", "finetune_filter", human.pairs)
    captioner = at("finetune_shared" if shared else "finetune_captioner")
    filt = at("finetune_shared" if shared else "finetune_filter")
    parts = params.capfilt.parts
    beams = params.caption.num_beams if params.capfilt.decoding == "beam" else 1
    if parts in ("captioner", "both"):
        rows.append(Row("caption", web.images, None, web.images * caption_flops(captioner, params.caption.max_length, beams),
                        f"{params.capfilt.decoding}, {beams} sequence(s) of <= {params.caption.max_length} tokens"))
    texts = 2 if parts in ("captioner", "both") else 1
    rows.append(Row("filter", web.pairs * texts, None,
                    web.images * filter_flops(filt, params.filter.max_length, texts),
                    "web + synthetic texts" if texts == 2 else "web texts"))
    bootstrapped = human.pairs + web.pairs * texts
    train_row("repretrain", "repretrain", bootstrapped, "upper bound: every web and synthetic text kept")
    for side in ("baseline", "capfilt"):
        if side == "capfilt":
            train_row("downstream_captioner", "finetune_captioner", human.pairs)
            train_row("downstream_retrieval", "finetune_filter", human.pairs)
        flops = sum(retrieval_eval_flops(at("finetune_filter"), n[s].images, n[s].pairs, params.evaluate.k_test,
                                         params.train("finetune_filter").max_text_len)
                    for s in params.evaluate.retrieval_splits if s in n)
        cap = n.get(params.evaluate.caption_split)
        if cap is not None:
            flops += cap.images * caption_flops(at("finetune_captioner"), params.caption.max_length,
                                                params.caption.num_beams)
        rows.append(Row(f"evaluate@{side}", sum(n[s].images for s in params.evaluate.retrieval_splits if s in n),
                        None, flops, f"k_test {params.evaluate.k_test}"))
    return rows, n


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    return flops / (peak_tflops * 1e12 * mfu) / 3600


def render(rows: list[Row], n: dict[str, Count], preset: str, peak_tflops: float, mfu: float) -> str:
    lines = [f"model {preset}; FLOPs counted analytically (blip/plan.py); GPU-hours at {mfu:.0%} MFU of "
             f"{peak_tflops:g} TFLOP/s", "",
             "samples: " + "; ".join(f"{s} {c.images:,} images / {c.pairs:,} pairs ({c.source})" for s, c in n.items()),
             "", "| stage | samples | steps | PFLOP | GPU-hours | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        steps = f"{r.steps:,}" if r.steps is not None else "–"
        lines.append(f"| {r.stage} | {r.samples:,} | {steps} | {r.flops / 1e15:,.3f} | "
                     f"{gpu_hours(r.flops, peak_tflops, mfu):,.2f} | {r.note} |")
    total = sum(r.flops for r in rows)
    lines.append(f"| **total** | | | **{total / 1e15:,.3f}** | **{gpu_hours(total, peak_tflops, mfu):,.2f}** | |")
    return "\n".join(lines)


def parse_samples(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        split, sep, value = item.partition("=")
        if not sep or split not in SPLITS:
            raise ValueError(f"--samples {item!r}: use SPLIT=N with SPLIT one of {', '.join(SPLITS)}")
        try:
            out[split] = int(float(value))
        except ValueError as e:
            raise ValueError(f"--samples {item!r}: N must be a number of images") from e
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variant", default=None, help="price params.yaml with params-NAME.yaml overlaid (not written)")
    ap.add_argument("--samples", nargs="+", default=[], metavar="SPLIT=N",
                    help="images per split (web, human, test, zeroshot) instead of counting the shards")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the accelerator's peak (default 989: H100 SXM bf16 dense)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation (default 0.4)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")


def main(args: argparse.Namespace) -> int:
    from . import params as P

    overrides: dict = {}
    if args.variant:
        path = P.variant_path(args.params, args.variant)
        if not path.is_file():
            raise P.ParamsError(f"variant {args.variant!r}: {path} not found")
        overrides.update(yaml.safe_load(path.read_text()) or {})
    overrides.update(P.parse_overrides(args.overrides))
    params = P.load(args.params, overrides)
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: a fraction in (0, 1]")
    rows, n = plan(params, parse_samples(args.samples))
    print(render(rows, n, params.model.preset, args.peak_tflops, args.mfu))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0
