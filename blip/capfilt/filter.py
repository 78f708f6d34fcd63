"""The ``filter`` stage: ITM and ITC scores of every web text and every synthetic text.

Paper §3.3: the filter (image-grounded encoder fine-tuned with ITC+ITM on the human pairs)
removes a text when its ITM head says "unmatched"; the maintainer's threshold is 0.5 on the
softmax p(match) (blip-facts §1.17, issue #46). Scoring and selecting are separate steps:
this stage stores the scores; ``selection.select`` applies a threshold, so trying another
threshold never rescores. The raw ITM logit and the ITC cosine are kept too: the logit is what
retrieval reranking adds, the cosine is the baseline filter that ``blip.evaluate`` compares with.

Each image goes through the ViT once and both of its texts are scored against it
(``itm_scores(..., image_index=...)``). Texts are tokenised with ``max_length`` 35 (BLIP's
retrieval setting).

Output: ``out_dir/<shard>.parquet`` per web shard, one row per input sample, in shard order::

    key            str
    web_text       str?     the sample's caption as the pre-training loader cleans it
    syn_text       str?     the synthetic caption (null without captions_dir, or when empty)
    itm_web        float32? softmax p(match) of (image, web_text)
    itm_syn        float32? softmax p(match) of (image, syn_text)
    itm_logit_web  float32? raw match logit (ITM head column 1)
    itm_logit_syn  float32?
    itc_web        float32? cosine of the normalised ITC features (not divided by temp)
    itc_syn        float32?
    status         str      "ok" or the loader's skip reason (scores are null then)

With several captions per image (``caption.candidates`` > 1) four list columns follow, and
``syn_text``/``*_syn`` are the first candidate's (so every reader of one synthetic text works)::

    syn_candidates list<str>     the image's distinct non-empty candidates, in draw order
    itm_cand, itm_logit_cand, itc_cand  list<float32>  their scores, aligned
    cand_drawn     int32        candidates drawn (N); ``cand_empty`` int32 of them empty — the
                                rest of the gap to ``len(syn_candidates)`` repeated an earlier one
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..data.shards import resolve_shards
from ..model.scoring import image_embeddings, itm_scores, text_embeddings
from .caption import EMPTY_CAPTION
from .caption import OK as CAPTION_OK
from .config import TEXT_MAX_LENGTH, FilterConfig
from .fingerprint import config_hash, content_hash, file_fingerprint
from .models import InferenceModel, model_fingerprint
from .reader import ShardReader
from .records import ShardResult, ShardTask
from .shardwork import result_name, run_shards, shard_tasks

STAGE = "filter"
VERSION = 1

SCORE_COLUMNS = ("itm_web", "itm_syn", "itm_logit_web", "itm_logit_syn", "itc_web", "itc_syn")
SCHEMA = pa.schema(
    [("key", pa.string()), ("web_text", pa.string()), ("syn_text", pa.string())]
    + [(c, pa.float32()) for c in SCORE_COLUMNS]
    + [("status", pa.string())]
)
CANDIDATE_COLUMNS = ("itm_cand", "itm_logit_cand", "itc_cand")
CANDIDATES_SCHEMA = pa.schema(
    list(SCHEMA) + [pa.field("syn_candidates", pa.list_(pa.string()))]
    + [pa.field(c, pa.list_(pa.float32())) for c in CANDIDATE_COLUMNS]
    + [pa.field("cand_drawn", pa.int32()), pa.field("cand_empty", pa.int32())]
)


def distinct_candidates(texts: list[str]) -> list[str]:
    """The non-empty texts of one image, each once, in draw order."""
    return list(dict.fromkeys(t for t in texts if t))


def read_captions(path: str) -> tuple[list[str], list[list[str] | None]]:
    """(keys, candidates or None) of a caption table: per sample all its drawn captions (one
    without ``candidates``; empty ones ""), None where the sample was not captioned."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the caption stage on the same web shards first")
    t = pq.read_table(path)
    keys, status = t.column("key").to_pylist(), t.column("status").to_pylist()
    if "candidates" in t.column_names:
        drawn = t.column("candidates").to_pylist()
    else:
        drawn = [[c] for c in t.column("caption").to_pylist()]
    caps = [d if s in (CAPTION_OK, EMPTY_CAPTION) and d else None for d, s in zip(drawn, status)]
    return keys, caps


class FilterWorker:
    """Scores one web shard (built once per thread pool / process; loads the filter)."""

    def __init__(self, cfg: FilterConfig, filter_dir: str, captions_dir: str | None, vocab_file: str | None = None):
        self.cfg = cfg
        self.captions_dir = captions_dir
        self.m = InferenceModel(filter_dir, "filter", cfg.device, vocab_file)

    def __call__(self, task: ShardTask) -> ShardResult:
        if "captions" in task.params:  # shipped with the task (executor: ray, another host)
            syn_keys, syn_caps = task.params["captions"]
        elif self.captions_dir is not None:
            syn_keys, syn_caps = read_captions(os.path.join(self.captions_dir, task.name))
        else:
            syn_keys, syn_caps = None, None
        reader = ShardReader(task.url, self.m.image_size, self.cfg.batch_size)
        cols: dict[str, dict[int, float]] = {c: {} for c in SCORE_COLUMNS}
        cand: dict[str, dict[int, list[float]]] = {c: {} for c in CANDIDATE_COLUMNS}
        distinct = None if syn_caps is None else [None if c is None else distinct_candidates(c) for c in syn_caps]
        with torch.inference_mode():
            for b in reader.batches():
                syn = [distinct[r] if distinct is not None and r < len(distinct) else None for r in b.rows]
                self._score(b, syn, cols, cand)
        if syn_keys is not None and syn_keys != reader.keys:
            raise ValueError(f"{os.path.join(self.captions_dir, task.name)} does not hold the samples of {task.url} "
                             "(keys differ): rerun the caption stage on these web shards")
        n = len(reader.keys)
        ok = [reader.status[i] == "ok" for i in range(n)]
        syn_text = [None] * n if distinct is None else [d[0] if ok[i] and d else None for i, d in enumerate(distinct)]
        data = {"key": reader.keys, "web_text": reader.texts, "syn_text": syn_text}
        for c in SCORE_COLUMNS:
            data[c] = [cols[c].get(i) for i in range(n)]
        data["status"] = reader.status
        several = syn_caps is not None and any(c is not None and len(c) > 1 for c in syn_caps)
        if several:
            data["syn_candidates"] = [d if ok[i] and d is not None else None for i, d in enumerate(distinct)]
            for c in CANDIDATE_COLUMNS:
                data[c] = [cand[c].get(i, []) if ok[i] and distinct[i] is not None else None for i in range(n)]
            data["cand_drawn"] = [len(c) if ok[i] and c is not None else None for i, c in enumerate(syn_caps)]
            data["cand_empty"] = [sum(1 for t in c if not t) if ok[i] and c is not None else None
                                  for i, c in enumerate(syn_caps)]
        return ShardResult(pa.table(data, schema=CANDIDATES_SCHEMA if several else SCHEMA), shard_error=reader.shard_error,
                           info={"with_captions": syn_caps is not None})

    def _score(self, b, syn: list[list[str] | None], cols: dict[str, dict[int, float]],
               cand: dict[str, dict[int, list[float]]]) -> None:
        """Scores of the batch's web texts and every candidate against their image (ViT once)."""
        m = self.m
        emb, img_feat = image_embeddings(m.model, b.images.to(m.device))  # ViT once per image
        texts = list(b.texts)
        image_index = list(range(len(texts)))
        targets = [("web", r, 0) for r in b.rows]
        for i, (row, candidates) in enumerate(zip(b.rows, syn)):
            for j, text in enumerate(candidates or ()):
                texts.append(text)
                image_index.append(i)
                targets.append(("syn", row, j))
        ids, mask = m.tokenize(texts, self.cfg.max_length)
        idx = torch.tensor(image_index, device=m.device)
        itm = itm_scores(m.model, emb, ids, mask, image_index=idx)
        itc = (img_feat[idx] * text_embeddings(m.model, ids, mask)).sum(-1)  # both normalised: cosine
        prob, logit, cos = itm.prob.float().cpu().tolist(), itm.logit.float().cpu().tolist(), itc.float().cpu().tolist()
        for (which, row, j), p, lg, c in zip(targets, prob, logit, cos):
            if j == 0:
                cols[f"itm_{which}"][row] = p
                cols[f"itm_logit_{which}"][row] = lg
                cols[f"itc_{which}"][row] = c
            if which == "syn":
                for name, v in (("itm_cand", p), ("itm_logit_cand", lg), ("itc_cand", c)):
                    cand[name].setdefault(row, []).append(v)


def score_shards(cfg: FilterConfig, filter_dir, web_shards, captions_dir, out_dir, tracker=None,
                 vocab_file=None, ray=None) -> dict:
    """Score every web sample of ``web_shards`` with the filter ``filter_dir`` (ours, an official
    ``.pth`` + ``vocab_file``, or a transformers folder: ``sources.py``): its web text
    and, when ``captions_dir`` (the caption stage's output) is given, its synthetic caption.
    Results in ``out_dir`` (module docstring); finished shards are skipped (same filter weights,
    same ``max_length``, same input shard, same caption table). ``ray``: ``RayOptions`` for
    ``executor: ray`` (the caption tables then travel with the tasks). Returns the ``run_shards`` summary."""
    urls = resolve_shards(web_shards)
    captions_dir = None if captions_dir is None else str(captions_dir)
    cfg_hash = config_hash(STAGE, VERSION, {"max_length": cfg.max_length, "filter": model_fingerprint(filter_dir, vocab_file),
                                            "with_captions": captions_dir is not None})

    def fingerprints(url: str) -> dict[str, str]:
        fp = {"shard": file_fingerprint(url)}
        if captions_dir is not None:
            cap = os.path.join(captions_dir, result_name(url))
            if not os.path.exists(cap):
                raise FileNotFoundError(f"no caption table {cap} for {url}: run the caption stage on these shards first")
            fp["captions"] = content_hash([cap])
        return fp

    tasks = shard_tasks(urls, result_name, fingerprints)
    if tracker is not None:
        tracker.log_params({f"{STAGE}.{k}": v for k, v in asdict(cfg).items()})

    def attach_captions(task: ShardTask) -> ShardTask:
        if captions_dir is None:
            return task
        return replace(task, params={**task.params, "captions": read_captions(os.path.join(captions_dir, task.name))})

    return run_shards(STAGE, tasks, out_dir, partial(FilterWorker, cfg, str(filter_dir), captions_dir, vocab_file), cfg_hash,
                      workers=cfg.workers, executor=cfg.executor, tracker=tracker, progress=cfg.progress, ray=ray,
                      prepare=attach_captions)


__all__ = ["CANDIDATES_SCHEMA", "CANDIDATE_COLUMNS", "SCHEMA", "SCORE_COLUMNS", "TEXT_MAX_LENGTH", "FilterConfig",
           "FilterWorker", "distinct_candidates", "read_captions", "score_shards"]
