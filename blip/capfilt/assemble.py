"""The ``assemble`` stage: the bootstrapped dataset = human pairs + kept web pairs + kept
synthetic pairs (paper §3.3, Fig. 3), as new webdataset shards for pre-training a new model.

Output layout (``out_dir``, a folder this stage owns)::

    00000.tar 00000_stats.json ...   img2dataset convention, 9-digit keys; load with
                                     blip.data.make_loader(out_dir, ...)
    sizes.json                       tar name -> samples (open_clip)
    stats.json                       counts per source, noise ratio (written last: its presence
                                     means the folder is complete)
    manifest/human-00000.parquet     one row per input sample: what became of it (below)
    manifest/web-00000.parquet

How sources are encoded: **one sample per kept (image, text) pair, one source per sample**, as
BLIP's released bootstrapped data lists each (url, caption) separately and as img2dataset would
download it. A web image whose web text and synthetic text are both kept becomes two samples (web
first, then synthetic, adjacent keys) sharing the image bytes' content and one ``image_id``; a
human image stays one sample with all its captions (``json["captions"]``), which the loader
expands into pairs in training. Each sample's ``.json``::

    key, caption, status ("success")        img2dataset's fields
    captions                                 human samples: all captions
    image_id                                 int, unique per image in the new set
    caption_source                           "human" | "web" | "synthetic"
    itm, itm_logit, itc                      the filter's scores of this text (null for human)
    orig_key, orig_shard                     where the image came from ("web/00003.tar")
    url, width, height, ...                  with ``web_metadata`` (bring-your-own-data runs): every
                                             field of the web sample's own ``.json`` (img2dataset's
                                             url, sizes, exif, ...), ``key``/``caption``/``status``
                                             excepted, and never the generator's ``noise`` label

Without ``web_metadata`` the web ``.json`` is not copied (it may hold the generator's evaluation-only labels); texts are
the filter's ``web_text``/``syn_text`` (as the loader cleans them), human captions as the decoder
cleans them. Output shards: each input shard owns a fixed block of output shard ids (human shards
first), enough for its worst case (``max_shard_samples`` per tar), so shards are assembled
independently and in parallel; unused ids leave gaps in the numbering, which loaders ignore.

Manifest columns: ``key``, ``status`` (loader verdict), ``human``/``web``/``synthetic``: "kept",
"filter" (below the rule's pass mark or cut), "rank" (outranked: ``top_k``, ``replace``),
"noise_label" (``score: oracle``, below), "duplicate_image"/"duplicate_url" (``dedup``), a skip
reason, or null where the source does not apply (``synthetic``: "kept" when any candidate is);
``synthetic_texts``: one verdict per drawn candidate (those, plus "empty_caption" and "same_text"
for drawn candidates that were empty or repeated an earlier one); ``web_pass``, ``syn_pass``
(candidate 0), ``syn_pass_each`` (score >= the pass mark, null if unscored); ``texts`` (pairs
written); ``out_keys``; ``duplicate_of`` (the kept copy, ``shard/key``).

The rule (``assemble.rule``, ``selection``): ``threshold`` (BLIP), ``top_k`` (BLIP-2),
``fraction`` (DataComp; its cut computed over every shard's table before any shard is assembled)
or ``replace``; each kept candidate is one more sample of the image (json ``candidate``: its index
among the image's distinct candidates). ``dedup``: before assembling, every input image is hashed
(or its url read; ``dedup.find_duplicates``), in shard order, and later copies of an image already
seen are dropped with all their texts.

``score: oracle`` (``capfilt.filter_score``) is the ceiling cell's **evaluation instrument, not a
filter**: the web texts are kept or dropped by the generator's hidden noise labels (read here, by
:func:`_oracle_labels`, through ``blip.data.labels.noise_labels`` — the one use of the labels on a
path that builds a dataset), the synthetic texts as the filter decides them (ITM p >= threshold).
It bounds what a perfect web filter could buy in this world. Shards without labels (real
img2dataset data) cannot have an oracle: the stage fails instead of keeping everything.
``stats.json`` says so: ``score`` "oracle", ``web_decided_by``, ``synthetic_decided_by``.

``stats.json``: per source ``input = kept + dropped`` (asserted, with ``input`` counted from the
input shards' metadata and ``kept`` from the written shards), ``dropped_by`` reason. Units: human
= images (kept with all their captions); web = texts (one per web image); synthetic = texts
(``candidates`` drawn per usable web image). Also ``rule`` (its name and numbers; ``fraction``:
``cut``, ``n_texts``, ``n_keep``, ``n_at_or_above``), ``dedup`` (mode, counts, the largest groups)
and ``repeated_texts`` (web texts shared by 3 or more images: placeholders, boilerplate).
``noise_ratio`` (Table 2) = share of scored synthetic texts (each distinct candidate) with
p < threshold, i.e. that the threshold rule drops (with ``score: itc``: below the ITC cut, reported as ``itc_cut``); ``web_drop_ratio`` = the same for web texts. Both describe the captioner/filter
pair at the threshold and are reported in every parts setting (null when nothing was scored; with
``score: oracle`` the ITM filter's, which the oracle does not apply to web texts).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import remove_stale_tmp, write_bytes_atomic
from ..data.decode import IMAGE_EXTS
from ..data.shards import (
    count_shards,
    dumps,
    is_local,
    resolve_shards,
    shard_file_name,
    write_shard,
    write_sizes,
)
from ..data.tario import RawSample, ShardEnd, iter_shard_samples
from .config import AssembleConfig
from .fingerprint import config_hash, content_hash, file_fingerprint
from .reader import SampleStream
from .records import OK, ShardResult, ShardTask, read_record, read_scores
from .selection import Rule, decide, fraction_cut, image_texts, itc_cut
from .shardwork import result_name, run_shards

_log = logging.getLogger("blip.capfilt")

STAGE = "assemble"
VERSION = 3  # 2: json 'caption_source' (was 'source'); 3: rules, candidates, dedup (manifest synthetic_texts)
MANIFEST = "manifest"
STATS = "stats.json"
KEPT, FILTERED = "kept", "filter"
NOISE_LABEL = "noise_label"  # score: oracle — a web text the hidden labels call noisy (not the filter's verdict)
ORACLE_STATS = {"web_decided_by": "hidden noise labels (evaluation instrument)",
                "synthetic_decided_by": "the filter (ITM p(match) >= threshold)"}
UNREAD = "unread_after_damage"  # samples behind the damage in a truncated/corrupt input shard
SOURCES = ("human", "web", "synthetic")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()),
    ("human", pa.string()), ("web", pa.string()), ("synthetic", pa.string()),
    ("web_pass", pa.bool_()), ("syn_pass", pa.bool_()),
    ("texts", pa.int32()), ("out_keys", pa.list_(pa.string())),
    ("synthetic_texts", pa.list_(pa.string())),  # one verdict per drawn candidate (null: no captioner or unusable)
    ("syn_pass_each", pa.list_(pa.bool_())),  # each distinct candidate: score >= the pass mark
    ("duplicate_of", pa.string()),  # dedup: the kept copy ("web/00000.tar/000000012")
])
REPEATED_MIN_IMAGES = 3  # stats.json repeated_texts: web texts on at least this many images
SAME_TEXT = "same_text"  # a candidate repeating an earlier candidate of the same image


def _shard_label(url: str) -> str:
    """``.../web/00003.tar`` -> ``web/00003.tar``: provenance without machine-specific paths."""
    if not is_local(url):
        return shard_file_name(url)
    return f"{os.path.basename(os.path.dirname(url))}/{os.path.basename(url)}"


class _OutputShards:
    """Numbers and writes the samples made from one input shard into its block of shard ids."""

    def __init__(self, out_dir: str, first_id: int, n_ids: int, per_shard: int):
        self.out_dir, self.first_id, self.n_ids, self.per_shard = out_dir, first_id, n_ids, per_shard
        self.members: list[list[tuple[str, bytes]]] = []
        self.counts: list[Counter] = []
        self.texts: list[Counter] = []
        self.n = 0

    def add(self, ext: str, image: bytes, caption: str, meta: dict, source: str, n_texts: int = 1) -> str:
        part, index = divmod(self.n, self.per_shard)
        if part >= self.n_ids:
            raise RuntimeError(f"more output samples than the {self.n_ids * self.per_shard} allocated: the input "
                               "shard holds more samples than its metadata says")
        if part == len(self.members):
            self.members.append([])
            self.counts.append(Counter())
            self.texts.append(Counter())
        shard_id = self.first_id + part
        key = f"{shard_id:05d}{index:04d}"
        meta = {"key": key, "caption": caption, "status": "success", **meta}
        if meta.get("image_id") is None:
            meta["image_id"] = int(key)
        self.members[part] += [(f"{key}.{ext}", image), (f"{key}.txt", caption.encode("utf-8")), (f"{key}.json", dumps(meta))]
        self.counts[part][source] += 1
        self.texts[part][source] += n_texts
        self.n += 1
        return key

    def write(self) -> list[str]:
        """Write the tars (+ ``_stats.json``), clear this block's unused ids and stale temporaries."""
        paths = []
        for j in range(self.n_ids):
            sid = self.first_id + j
            base = os.path.join(self.out_dir, f"{sid:05d}")
            for p in (base + ".tar", base + "_stats.json"):
                remove_stale_tmp(p)
            if j < len(self.members):
                extra = {"sources": dict(self.counts[j]), "source_texts": dict(self.texts[j])}
                tar = write_shard(self.out_dir, sid, self.members[j], sum(self.counts[j].values()),
                                  sum(self.texts[j].values()), extra_stats=extra)
                paths += [tar, base + "_stats.json"]
            else:
                for p in (base + ".tar", base + "_stats.json"):
                    if os.path.exists(p):
                        os.remove(p)
        return paths


class AssembleWorker:
    def __init__(self, cfg: AssembleConfig, out_dir: str, rule: Rule):
        self.cfg, self.out_dir, self.rule = cfg, out_dir, rule  # rule: with its cuts computed over all shards

    def __call__(self, task: ShardTask) -> ShardResult:
        p = task.params
        out = _OutputShards(self.out_dir, p["first_id"], p["n_ids"], self.cfg.max_shard_samples)
        rows, shard_error = self._human(task, out) if p["role"] == "human" else self._web(task, out)
        outputs = out.write()  # before the manifest, which is the commit mark
        return ShardResult(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), outputs=outputs, shard_error=shard_error)

    def _human(self, task: ShardTask, out: _OutputShards) -> tuple[list[dict], str | None]:
        stream = SampleStream(task.url)
        dup = task.params.get("duplicates", {})
        rows = []
        for v in stream:
            row = _row(v.key, v.status, human=KEPT if v.status == OK else v.status)
            if v.status == OK and v.key in dup:
                row["human"], row["duplicate_of"] = self._dup_reason(), dup[v.key]
            elif v.status == OK:
                ext, image = v.image_member()
                caps = v.sample.captions
                meta = {"captions": caps, "caption_source": "human", "itm": None, "itm_logit": None, "itc": None,
                        "orig_key": v.key, "orig_shard": _shard_label(task.url)}
                row["out_keys"] = [out.add(ext, image, caps[0], meta, "human", n_texts=len(caps))]
                row["texts"] = len(caps)
            rows.append(row)
        return rows, stream.shard_error

    def _web(self, task: ShardTask, out: _OutputShards) -> tuple[list[dict], str | None]:
        cfg = self.cfg
        scores = read_scores(task.params["scores"], cfg.use_captioner)
        dec = decide(scores, use_filter=cfg.use_filter, use_captioner=cfg.use_captioner, rule=self.rule).to_pylist()
        sc = scores.to_pylist()
        clean = task.params.get("clean")  # score: oracle — key -> the hidden label says clean
        if clean is not None:
            dec = [_oracle_decision(d, r, clean, task.url) for d, r in zip(dec, sc)]
        rows, shard_error, i = [], None, 0
        for raw in iter_shard_samples(task.url):  # bytes only: the verdicts are in the score table
            if isinstance(raw, ShardEnd):
                shard_error = raw.error
                continue
            if i >= len(sc) or sc[i]["key"] != raw.key:
                raise ValueError(f"{task.params['scores']} does not match {task.url} at sample {i} (key {raw.key!r}): "
                                 "rerun the filter stage on these web shards")
            rows.append(self._web_sample(task, raw, sc[i], dec[i], out))
            i += 1
        if i != len(sc):
            raise ValueError(f"{task.params['scores']} has {len(sc)} rows but {task.url} has {i} samples: rerun the filter stage")
        return rows, shard_error

    def _web_meta(self, raw: RawSample) -> dict:
        """The web sample's own metadata to carry over (``web_metadata``), else nothing."""
        if not self.cfg.web_metadata or "json" not in raw.fields:
            return {}
        try:
            meta = json.loads(raw.fields["json"])
        except (ValueError, RecursionError):
            return {}  # an unreadable .json: the reader counted the sample's status already
        return {k: v for k, v in meta.items() if k not in EVAL_ONLY and k not in OWN_FIELDS} \
            if isinstance(meta, dict) else {}

    def _dup_reason(self) -> str:
        return f"duplicate_{self.cfg.dedup}"

    def _web_sample(self, task: ShardTask, raw: RawSample, s: dict, d: dict, out: _OutputShards) -> dict:
        cfg, ok = self.cfg, d["status"] == OK
        web = (KEPT if d["keep_web"] else (d.get("web_drop") or FILTERED)) if ok else d["status"]
        verdicts = _candidate_verdicts(s, d) if cfg.use_captioner and ok else None
        row = _row(s["key"], d["status"], web=web, web_pass=d["web_pass"], syn_pass=d["syn_pass"])
        original = task.params.get("duplicates", {}).get(raw.key)
        if ok and original is not None:  # a later copy of an image already in the set: nothing of it is kept
            row["web"], row["duplicate_of"] = self._dup_reason(), original
            verdicts = None if verdicts is None else [self._dup_reason()] * len(verdicts)
            d = {**d, "keep_web": False, "keep_syn": False, "cand_keep": [False] * len(d["cand_keep"])}
        if verdicts is not None:
            row["synthetic_texts"], row["syn_pass_each"] = verdicts, d["cand_pass"]
            row["synthetic"] = KEPT if KEPT in verdicts else verdicts[0]
        if d["keep_web"] or d["keep_syn"]:
            ext = next(e for e in IMAGE_EXTS if e in raw.fields)
            web_text, cands = image_texts(s)
            several = s.get("syn_candidates") is not None
            texts = [("web", web_text, None)] if d["keep_web"] else []
            texts += [("synthetic", c, j) for j, (c, k) in enumerate(zip(cands, d["cand_keep"])) if k]
            image_id = None
            for source, t, j in texts:
                meta = {**self._web_meta(raw), "caption_source": source, "itm": t["itm"], "itm_logit": t["itm_logit"],
                        "itc": t["itc"], "orig_key": raw.key, "orig_shard": _shard_label(task.url),
                        "image_id": image_id}
                if several and j is not None:
                    meta["candidate"] = j  # index among the image's distinct candidates
                key = out.add(ext, raw.fields[ext], t["text"], meta, source)
                image_id = image_id if image_id is not None else int(key)  # all texts of an image: one id
                row["out_keys"].append(key)
                row["texts"] += 1
        return row


EVAL_ONLY = ("noise",)  # the generator's hidden labels (blip.data.labels): never in a dataset
OWN_FIELDS = ("key", "caption", "status", "captions", "image_id")  # what this stage writes itself


def _candidate_verdicts(s: dict, d: dict) -> list[str]:
    """One verdict per drawn candidate of a usable image: kept | filter | rank for its distinct
    candidates, then empty_caption and same_text for the drawn ones that were not scored."""
    verdicts = [KEPT if k else why for k, why in zip(d["cand_keep"], d["cand_drop"])]
    if s.get("cand_drawn") is None:  # one caption per image (BLIP)
        return verdicts or ["empty_caption"]
    empty = s["cand_empty"] or 0
    return verdicts + ["empty_caption"] * empty + [SAME_TEXT] * (s["cand_drawn"] - empty - len(verdicts))


def _oracle_decision(d: dict, s: dict, clean: dict[str, bool], url: str) -> dict:
    """``score: oracle``: the web text kept exactly when the hidden label calls it clean; the
    synthetic decision (the filter's) untouched."""
    if d["status"] != OK or not s["web_text"]:
        return d
    if s["key"] not in clean:
        raise ValueError(f"{url}: sample {s['key']} has no readable noise label, so the oracle cannot decide its web "
                         "text; regenerate the data (the data stage)")
    return {**d, "keep_web": clean[s["key"]], "web_drop": NOISE_LABEL}


def _oracle_labels(web: list[str]) -> dict[str, dict[str, bool]]:
    """``score: oracle``: per web shard, ``key -> clean`` from the generator's hidden noise labels.
    The ceiling cell's evaluation instrument, and the only reader of the labels on a path that
    builds a dataset (``tests/test_data_noise_isolation.py`` lists every caller). Raises
    ``ValueError`` for shards without labels (real data): no labels, no oracle."""
    from ..data.labels import noise_labels

    out = {}
    for url in web:
        try:
            labels = noise_labels(url, required=True)
        except ValueError as e:
            raise ValueError(f"capfilt.filter_score=oracle keeps the web texts the generator's hidden noise labels call "
                             f"clean, but {e}. No labels, no oracle: use filter_score itm or itc on this data") from None
        out[url] = {key: kind is None for key, kind in labels.items()}
    return out


def _row(key: str, status: str, human=None, web=None, synthetic=None, web_pass=None, syn_pass=None) -> dict:
    return {"key": key, "status": status, "human": human, "web": web, "synthetic": synthetic,
            "web_pass": web_pass, "syn_pass": syn_pass, "texts": 0, "out_keys": [], "synthetic_texts": None,
            "syn_pass_each": None, "duplicate_of": None}


# ---- the stage --------------------------------------------------------------------------------


def _check_out_dir(out_dir: str, inputs: list[str]) -> None:
    """``out_dir`` is replaced shard by shard, so it must be this stage's own folder."""
    folders = {os.path.realpath(os.path.dirname(u)) for u in inputs}
    if os.path.realpath(out_dir) in folders:
        raise ValueError(f"out_dir {out_dir} is an input shard folder; assemble into a folder of its own")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isdir(os.path.join(out_dir, MANIFEST)):
        raise FileExistsError(f"{out_dir} holds files that assemble did not write (no {MANIFEST}/ folder); it replaces "
                              "the tars of its output folder, so give it a new or empty folder")


def _candidates_per_image(scores: str) -> int:
    """Texts drawn per image in a score table: ``cand_drawn`` (``caption.candidates``), else 1."""
    table = read_scores(scores, columns=["cand_drawn"])  # the one score-table reader
    if "cand_drawn" not in table.column_names:
        return 1
    return max((n for n in table.column(0).to_pylist() if n is not None), default=1)


def _tasks(cfg: AssembleConfig, human: list[str], web: list[str], scores_dir: str,
           clean: dict[str, dict[str, bool]] | None = None, dups=None) -> list[ShardTask]:
    """One task per input shard, each owning a block of output shard ids sized for its worst case.
    ``clean`` (``score: oracle``): per web shard the hidden labels' verdicts, handed to its worker
    (they come from the web shard, which is fingerprinted already). ``dups``: the later copies
    to drop, per shard (they depend on the other shards, so they are fingerprinted here)."""
    counts = count_shards(human + web)
    tasks, next_id = [], 0
    for role, urls in (("human", human), ("web", web)):
        for url in urls:
            n = counts[url].samples
            params = {"role": role}
            inputs = {"shard": file_fingerprint(url)}
            per_image = 1
            if role == "web":
                scores = os.path.join(scores_dir, result_name(url))
                if not os.path.exists(scores):
                    raise FileNotFoundError(f"no score table {scores} for {url}: run the filter stage on these shards first")
                inputs["scores"] = content_hash([scores])
                params["scores"] = scores
                params["candidates"] = _candidates_per_image(scores) if cfg.use_captioner else 0
                per_image = 1 + params["candidates"]
                if clean is not None:
                    params["clean"] = clean[url]
            if dups is not None and dups.drop.get(url):
                params["duplicates"] = dups.drop[url]
                inputs["duplicates"] = config_hash("dedup", 1, dups.drop[url])
            n_ids = math.ceil(n * per_image / cfg.max_shard_samples)
            inputs["out_ids"] = f"{next_id}+{n_ids}"
            params |= {"first_id": next_id, "n_ids": n_ids}
            tasks.append(ShardTask(url, f"{role}-{result_name(url)}", n, inputs, params))
            next_id += n_ids
    if next_id > 100_000:
        raise ValueError(f"{next_id} output shards do not fit 5-digit shard ids; raise max_shard_samples or split the data")
    return tasks


def _prune(out_dir: str, tasks: list[ShardTask]) -> list[dict]:
    """Records of the current manifests; delete manifests, tars and temporaries no task owns."""
    mdir = os.path.join(out_dir, MANIFEST)
    names = {t.name for t in tasks}
    for p in glob.glob(os.path.join(mdir, "*")):
        if os.path.basename(p) not in names:
            os.remove(p)
    records = [read_record(os.path.join(mdir, t.name)) for t in tasks]
    keep = {os.path.normpath(os.path.join(mdir, rel)) for r in records for rel in r["outputs"]}
    for pattern in ("*.tar", "*_stats.json", "*.tmp.*", "*.tmp-*"):
        for p in glob.glob(os.path.join(out_dir, pattern)):
            if os.path.normpath(p) not in keep:
                os.remove(p)
    return records


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stats(cfg: AssembleConfig, tasks: list[ShardTask], records: list[dict], out_dir: str) -> tuple[dict, list[str]]:
    mdir = os.path.join(out_dir, MANIFEST)
    decisions = {s: Counter() for s in SOURCES}
    passes = {"web_pass": Counter(), "syn_pass": Counter()}
    images, expected_synthetic = 0, 0
    for task, rec in zip(tasks, records):
        t = pq.read_table(os.path.join(mdir, task.name),
                          columns=["human", "web", "synthetic_texts", "web_pass", "syn_pass_each", "texts", "status"])
        for s in ("human", "web"):
            decisions[s].update(v for v in t.column(s).to_pylist() if v is not None)
        for verdicts in t.column("synthetic_texts").to_pylist():
            decisions["synthetic"].update(verdicts or ())
        passes["web_pass"].update(v for v in t.column("web_pass").to_pylist() if v is not None)
        for each in t.column("syn_pass_each").to_pylist():
            passes["syn_pass"].update(v for v in each or () if v is not None)
        images += sum(1 for n in t.column("texts").to_pylist() if n)
        if task.params["role"] == "web":  # every usable web image drew `candidates` captions
            expected_synthetic += task.params["candidates"] * sum(1 for st in t.column("status").to_pylist() if st == OK)
        unread = task.expected_rows - rec["rows"]  # behind the damage of a truncated input shard
        if unread:
            decisions[task.params["role"]][UNREAD] += unread
    written = {"samples": Counter(), "texts": Counter()}
    tars = []
    for rec in records:
        for rel in rec["outputs"]:
            if rel.endswith("_stats.json"):
                st = _read_json(os.path.normpath(os.path.join(mdir, rel)))
                written["samples"].update(st["sources"])
                written["texts"].update(st["source_texts"])
            else:
                tars.append(os.path.basename(rel))
    expected = {
        "human": sum(t.expected_rows for t in tasks if t.params["role"] == "human"),
        "web": sum(t.expected_rows for t in tasks if t.params["role"] == "web"),
        "synthetic": expected_synthetic,  # candidates drawn per usable web image (BLIP: 1)
    }
    sources = {}
    for s in SOURCES:
        d = decisions[s]
        kept, dropped = d[KEPT], d.total() - d[KEPT]
        sources[s] = {"input": expected[s], "kept": kept, "dropped": dropped,
                      "dropped_by": dict(sorted((k, v) for k, v in d.items() if k != KEPT))}
        # input counted from the input shards, kept from the written shards, dropped from the decisions
        assert expected[s] == kept + dropped, f"{s}: input {expected[s]} != kept {kept} + dropped {dropped}"
        assert written["samples"][s] == kept, f"{s}: {written['samples'][s]} samples written but {kept} kept"

    def ratio(c: Counter) -> float | None:
        n = c[True] + c[False]
        return c[False] / n if n else None

    texts = {s: written["texts"][s] for s in SOURCES}
    per_image = max((t.params.get("candidates", 0) for t in tasks), default=0)
    return {
        "parts": cfg.parts, "use_filter": cfg.use_filter, "use_captioner": cfg.use_captioner, "threshold": cfg.threshold,
        "candidates": per_image,
        "units": {"human": "images (kept with all their captions)", "web": "texts (one per web image)",
                  "synthetic": f"texts ({per_image} drawn per usable web image)"},
        "sources": sources,
        "noise_ratio": ratio(passes["syn_pass"]),
        "web_drop_ratio": ratio(passes["web_pass"]),
        "texts": {**texts, "total": sum(texts.values())},
        "samples": sum(written["samples"].values()),
        "images": images,
        "shards": len(tars),
    }, sorted(tars)


def _rule(cfg: AssembleConfig, web_tables: list[pa.Table]) -> tuple[Rule, dict]:
    """The rule with its global cuts computed over every shard's table, and what ``stats.json``
    records of it."""
    score = "itm" if cfg.score == "oracle" else cfg.score  # the oracle's synthetic texts: the ITM filter
    cut, info = cfg.threshold, {"name": cfg.rule}
    if cfg.use_filter and cfg.score == "itc":  # one global cut over every shard's cosines
        found = itc_cut(web_tables, cfg.threshold, cfg.use_captioner)
        cut = found["cut"]
        info["itc_cut"] = {**found, "cut": cut if math.isfinite(cut) else None}
    frac = None
    if cfg.rule == "top_k":
        info |= {"top_k": cfg.top_k, "rank_score": cfg.rank_score}
    elif cfg.rule == "replace":
        info |= {"rank_score": cfg.rank_score, "pass": f"{score} >= {cut}"}
    elif cfg.rule == "fraction":
        found = fraction_cut(web_tables, cfg.fraction, cfg.rank_score, cfg.use_captioner)
        frac = found["cut"]
        info |= {**found, "cut": frac if math.isfinite(frac) else None}
    else:
        info |= {"threshold": cfg.threshold, "score": score}
    return Rule(cfg.rule, cut, score, cfg.rank_score, cfg.top_k, frac), info


def _repeated_web_texts(web_tables: list[pa.Table], min_images: int) -> dict:
    """Web texts that many images share (placeholders, boilerplate), with their counts."""
    from .dedup import repeated_texts

    pairs = ((f"{i}/{k}", t) for i, tab in enumerate(web_tables)
             for k, t, st in zip(tab.column("key").to_pylist(), tab.column("web_text").to_pylist(),
                                 tab.column("status").to_pylist()) if st == OK and t)
    return repeated_texts(pairs, min_images=min_images)


def assemble(cfg: AssembleConfig, human_shards, web_shards, scores_dir, out_dir, tracker=None) -> dict:
    """Write the bootstrapped dataset into ``out_dir`` (module docstring) from the human shards,
    the web shards and the filter's score tables in ``scores_dir``; returns the ``stats.json``
    content plus ``run`` (the ``run_shards`` summary: shards done / skipped). Input shards whose
    manifest is valid (same config, same input shard and score table) are not redone."""
    human = resolve_shards(human_shards) if human_shards else []  # none: your own web shards alone
    web = resolve_shards(web_shards)
    out_dir, scores_dir = str(out_dir), str(scores_dir)
    _check_out_dir(out_dir, human + web)
    oracle = cfg.score == "oracle" and cfg.use_filter
    dups = None
    if cfg.dedup != "none":
        from .dedup import find_duplicates

        dups = find_duplicates(human + web, cfg.dedup)
    tasks = _tasks(cfg, human, web, scores_dir, _oracle_labels(web) if oracle else None, dups)
    os.makedirs(out_dir, exist_ok=True)
    stats_path = os.path.join(out_dir, STATS)
    if os.path.exists(stats_path):
        os.remove(stats_path)  # the folder is complete again only when stats.json is rewritten
    web_tables = [read_scores(t.params["scores"], cfg.use_captioner) for t in tasks if t.params["role"] == "web"]
    rule, rule_info = _rule(cfg, web_tables)
    cfg_hash = config_hash(STAGE, VERSION, {k: getattr(cfg, k) for k in ("threshold", "score", "use_filter",
                                                                       "use_captioner", "max_shard_samples",
                                                                       "web_metadata", "dedup")}
                           | {"rule": asdict(rule)})
    if tracker is not None:
        tracker.log_params({f"{STAGE}.{k}": v for k, v in asdict(cfg).items()} | {f"{STAGE}.parts": cfg.parts})
    run = run_shards(STAGE, tasks, os.path.join(out_dir, MANIFEST), partial(AssembleWorker, cfg, out_dir, rule), cfg_hash,
                     workers=cfg.workers, executor=cfg.executor, tracker=tracker, progress=cfg.progress)
    records = _prune(out_dir, tasks)
    stats, tars = _stats(cfg, tasks, records, out_dir)
    stats["score"] = cfg.score
    stats["rule"] = rule_info
    stats["dedup"] = {"mode": cfg.dedup, **(dups.to_stats() if dups is not None else {})}
    stats["repeated_texts"] = _repeated_web_texts(web_tables, REPEATED_MIN_IMAGES)
    if oracle:
        stats.update(ORACLE_STATS)
    if "itc_cut" in rule_info:
        stats["itc_cut"] = rule_info["itc_cut"]
    write_sizes(out_dir, {t: _read_json(os.path.join(out_dir, t[:-4] + "_stats.json"))["count"] for t in tars})
    write_bytes_atomic(stats_path, json.dumps(stats, indent=1, sort_keys=True).encode())
    if cfg.use_filter and cfg.rule == "threshold" and (stats["web_drop_ratio"] or 0.0) > 0.9:
        _log.warning("assemble: the filter drops %.0f%% of web texts at threshold %.2f; is it trained? An untrained "
                     "ITM head gives p(match) near 1/3 for every pair (ITM trains on 1 positive per 2 hard negatives); "
                     "look at the itm_web column in %s", 100 * stats["web_drop_ratio"], cfg.threshold, scores_dir)
    if tracker is not None:
        tracker.log_metrics({f"{STAGE}/{s}_{k}": stats["sources"][s][k] for s in SOURCES for k in ("input", "kept", "dropped")}
                            | {f"{STAGE}/{k}": stats[k] for k in ("noise_ratio", "web_drop_ratio") if stats[k] is not None})
        tracker.log_artifact(stats_path)
    return {**stats, "run": run}
