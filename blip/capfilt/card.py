"""The dataset card (``README.md``) of an assembled CapFilt folder, in the Hugging Face format.

``write_card(out_dir)`` reads what :func:`blip.capfilt.assemble.assemble` wrote (``stats.json``
and the ``NNNNN.tar`` shards' ``.json`` members) and writes ``out_dir/README.md``:

* YAML front matter: ``pretty_name``, ``license``, ``task_categories``, ``size_categories`` (by
  samples), ``tags``, ``configs`` (``default``: ``*.tar`` as the train split, so that
  ``datasets.load_dataset(out_dir)`` finds the shards) and ``dataset_info.features``: the schema
  of every member, the ``.json`` struct as the union of the keys of **all** samples. Without it
  ``datasets`` infers the schema from the first 5 samples of the first tar — human samples, whose
  ``itm``/``itc`` are null — and fails on the first web sample ("Couldn't cast double to null").
* Markdown: summary, counts per source (``stats["sources"]``), the selection rule and every other
  ``stats.json`` entry (rendered generically, so keys added later show up), the models, text
  histograms of the kept texts' ``itm``/``itc`` per ``caption_source`` (and ``stats["histograms"]``
  if present), the gallery, and how to load it (webdataset, ``datasets``, ``make_loader``).

The card is deterministic (no timestamps, sorted keys), so a DVC output stays reproducible. The
snippets name the folder as given when it is a relative path, else by its base name.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import yaml

from ..atomic import write_bytes_atomic
from ..data.decode import IMAGE_EXTS
from ..data.tario import RawSample, iter_shard_samples

CARD, STATS = "README.md", "stats.json"
SOURCES = ("human", "web", "synthetic")
_OWN = {"sources", "texts", "units", "samples", "images", "shards", "histograms"}  # sections of their own
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
_DTYPES = ((bool, "bool"), (int, "int64"), (float, "float64"), (str, "string"))  # bool before int
_BAR, _BINS, _MAX_ITEMS = 30, 10, 12


def size_category(n: int) -> str:
    return next((name for bound, name in _SIZES if n < bound), "n>1B")


def _tars(out_dir: str) -> list[str]:
    tars = sorted(n for n in os.listdir(out_dir) if n.endswith(".tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {out_dir}: run the assemble stage first")
    return tars


def brace_pattern(tars: list[str]) -> str:
    """``{00000..00003}.tar`` for ``tars`` (numbered names; runs of consecutive ids, gaps left out)."""
    stems = [t[:-4] for t in sorted(tars)]
    if len(stems) == 1:
        return tars[0]
    if not all(re.fullmatch(r"\d+", s) and len(s) == len(stems[0]) for s in stems):
        return "{" + ",".join(stems) + "}.tar"
    runs: list[list[str]] = []
    for s in stems:
        if runs and int(s) == int(runs[-1][-1]) + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    parts = [r[0] if len(r) == 1 else f"{{{r[0]}..{r[-1]}}}" for r in runs]
    return (parts[0] if len(parts) == 1 else "{" + ",".join(parts) + "}") + ".tar"


def _kind(v) -> object:
    """A value's ``datasets`` feature: a dtype name, ("list", kind) or ("struct", {key: kind})."""
    if isinstance(v, list):
        inner = "null"
        for x in v:
            inner = _merge(inner, _kind(x))
        return ("list", inner)
    if isinstance(v, dict):
        return ("struct", {k: _kind(x) for k, x in v.items()})
    return "null" if v is None else next((d for t, d in _DTYPES if isinstance(v, t)), "string")


def _merge(a, b):
    if a == b or b == "null":
        return a
    if a == "null":
        return b
    if isinstance(a, str) and isinstance(b, str) and {a, b} == {"int64", "float64"}:
        return "float64"
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "list":
        return ("list", _merge(a[1], b[1]))
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "struct":
        return ("struct", {k: _merge(a[1].get(k, "null"), b[1].get(k, "null")) for k in sorted({*a[1], *b[1]})})
    return "string"  # conflicting types: read as text


def _yaml_feature(name: str | None, kind) -> dict:
    head = {} if name is None else {"name": name}
    if isinstance(kind, str):
        return head | {"dtype": kind}
    if kind[0] == "list":
        inner = _yaml_feature(None, kind[1])
        return head | {"list": inner["dtype"] if list(inner) == ["dtype"] else inner}
    return head | {"struct": [_yaml_feature(k, v) for k, v in sorted(kind[1].items())]}


def scan(out_dir: str) -> tuple[dict, dict, int]:
    """(members: extension -> feature kind, scores: (score, source) -> values of kept texts, samples)."""
    members: dict[str, object] = {"__key__": "string", "__url__": "string"}
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    n = 0
    for tar in _tars(out_dir):
        for s in iter_shard_samples(os.path.join(out_dir, tar)):  # one sample's bytes at a time
            if not isinstance(s, RawSample):
                if s.error:
                    raise ValueError(f"{s.url} is damaged ({s.error}): rerun the assemble stage")
                continue
            n += 1
            try:
                meta = json.loads(s.fields.get("json", b"{}"))
            except ValueError as e:
                raise ValueError(f"{s.url}: sample {s.key} has an unreadable .json ({e}): rerun assemble") from e
            for ext in s.fields.keys() - {"json"}:
                members.setdefault(ext, "image" if ext in IMAGE_EXTS else "string")
            members["json"] = _merge(members.get("json", "null"), _kind(meta))
            for score in ("itm", "itc"):
                if isinstance(meta.get(score), (int, float)):
                    scores[(score, meta.get("caption_source", "?"))].append(float(meta[score]))
    order = {k: i for i, k in enumerate(("itm", "itc", *SOURCES))}
    scores = dict(sorted(scores.items(), key=lambda kv: [order.get(x, 9) for x in kv[0]]))
    return dict(sorted(members.items())), scores, n


def front_matter(stats: dict, features: dict, n: int, name: str | None, license: str) -> str:
    meta = {
        "pretty_name": name or f"BLIP CapFilt bootstrapped data ({stats.get('parts', 'unknown parts')})",
        "license": license, "task_categories": ["image-to-text", "text-to-image"],
        "size_categories": [size_category(n)], "tags": ["webdataset", "capfilt", "blip"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}],
        "dataset_info": {"config_name": "default", "features": [_yaml_feature(k, v) for k, v in features.items()]},
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _fmt(v) -> str:
    return "null" if v is None else f"{v:.6g}" if isinstance(v, float) else f"`{v}`" if isinstance(v, str) else str(v)


def render_value(key: str, v, depth: int = 0) -> list[str]:
    """Bullets for one stats entry: scalars inline, dicts/lists nested (long ones cut, pointing to stats.json)."""
    pad = "  " * depth
    if not isinstance(v, (dict, list)):
        return [f"{pad}- **{key}**: {_fmt(v)}"]
    items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
    lines = [f"{pad}- **{key}**:" + (" (empty)" if not items else "")]
    for k, x in items[:_MAX_ITEMS]:
        lines += render_value(str(k), x, depth + 1) if depth < 2 else [f"{pad}  - **{k}**: `{json.dumps(x)[:80]}`"]
    if len(items) > _MAX_ITEMS:
        lines.append(f"{pad}  - ... {len(items) - _MAX_ITEMS} more (see `stats.json`)")
    return lines


def histogram(values: list[float], lo: float | None = None, hi: float | None = None, bins: int = _BINS) -> list[str]:
    lo, hi = min(values) if lo is None else lo, max(values) if hi is None else hi
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    return _bars([lo + i * width for i in range(bins + 1)], counts)


def _bars(edges: list[float], counts: list[int]) -> list[str]:
    top = max(counts, default=0) or 1
    return [f"[{a:6.3f}, {b:6.3f})  {'#' * round(_BAR * c / top):<{_BAR}}  {c}"
            for a, b, c in zip(edges, edges[1:], counts)]


def _histogram_section(scores: dict, given) -> list[str]:
    out = ["## Score histograms", "", "ITM p(match) (bins over [0, 1]) and ITC cosine (bins over the observed "
           "range) of the kept texts, per `caption_source`, from the shards' `.json` members. Human samples carry "
           "no scores.", ""]
    for (score, source), values in scores.items():
        lo, hi = (0.0, 1.0) if score == "itm" else (None, None)
        out += [f"**{score}, {source}** ({len(values)} texts)", "", "```", *histogram(values, lo, hi), "```", ""]
    if not scores:
        out += ["No kept text carries a score (no filter ran).", ""]
    for key, h in (given.items() if isinstance(given, dict) else []):  # stats["histograms"]: {name: {edges, counts}}
        ok = isinstance(h, dict) and isinstance(h.get("edges"), list) and isinstance(h.get("counts"), list) \
            and len(h["edges"]) == len(h["counts"]) + 1
        out += [f"**{key}** (stats.json)", "", "```", *(_bars(h["edges"], h["counts"]) if ok else [json.dumps(h)]),
                "```", ""]
    return out


def _summary(name: str | None, n: int, n_tars: int) -> list[str]:
    return [f"# {name or 'BLIP CapFilt bootstrapped data'}", "", "## Summary", "",
            "Image-text pairs bootstrapped with BLIP's CapFilt (Li et al. 2022, §3.3): human-annotated pairs, plus "
            "web pairs and synthetic captions (from the captioner) that the filter (ITM head) kept. One sample per "
            "kept (image, text) pair, with its source and scores in the `.json` member; human samples keep all their "
            f"captions. Written by `blip.capfilt.assemble`: {n} samples in {n_tars} webdataset shards.", ""]


def _counts(stats: dict) -> list[str]:
    lines = ["## Sources and counts", "", "| source | unit | input | kept | dropped | dropped by |",
             "|---|---|---|---|---|---|"]
    units = stats.get("units", {})
    for s, c in sorted(stats.get("sources", {}).items(), key=lambda kv: (SOURCES + (kv[0],)).index(kv[0])):
        why = ", ".join(f"{k} {v}" for k, v in c.get("dropped_by", {}).items()) or "-"
        lines.append(f"| {s} | {units.get(s, '')} | {c.get('input')} | {c.get('kept')} | {c.get('dropped')} | {why} |")
    lines.append("")
    return lines + [x for k in ("samples", "images", "shards", "texts") if k in stats
                    for x in render_value(k, stats[k])]


def _models(models: dict | None) -> list[str]:
    if models is None:
        return ["## Models", "", "not recorded", ""]
    rows = [f"| {m} | {(i or {}).get('path') or 'not recorded'} | {(i or {}).get('digest') or 'not recorded'} |"
            for m, i in sorted(models.items())]
    return ["## Models", "", "| model | path | digest |", "|---|---|---|", *rows, ""]


def _gallery(out_dir: str, gallery) -> list[str]:
    path = None if gallery is None else os.path.join(out_dir, os.fspath(gallery))  # relative: to the card
    if path is None or not os.path.isfile(path):
        return []
    return ["## Gallery", "", f"![gallery]({os.path.relpath(path, out_dir).replace(os.sep, '/')})", ""]


def _how_to_load(ref: str, tars: list[str]) -> list[str]:
    return ["## How to load", "", "```python", "import webdataset as wds", "",
            f'ds = wds.WebDataset("{ref}/{brace_pattern(tars)}").decode("pil").to_tuple("jpg;png", "txt", "json")',
            "```", "", "With `datasets` (this card's `dataset_info` gives the `.json` schema; without it the first "
            "samples' null scores break the inference):", "", "```python", "import datasets", "",
            f'ds = datasets.load_dataset("{ref}", split="train")  # this card\'s configs', "# or, naming the tars:",
            f'features = datasets.load_dataset_builder("{ref}").info.features',
            f'ds = datasets.load_dataset("webdataset", data_files={{"train": "{ref}/*.tar"}}, split="train", '
            "features=features)", "```", "", "With this project's loader (BLIP batches: `image`, `text`, `captions`, "
            "`key`, `image_id`, `shard`; `train=True` shuffles, augments and yields one item per caption):", "",
            "```python", "from blip.data.loader import make_loader", "",
            f'loader = make_loader("{ref}", batch_size=64, image_size=384, num_workers=4, train=True)', "```", ""]


def render_card(out_dir, stats: dict | None = None, models: dict | None = None, gallery=None,
                name: str | None = None, license: str = "other") -> str:
    """The card's text for the assembled folder ``out_dir`` (see the module docstring)."""
    out_dir = os.fspath(out_dir)
    stats = read_stats(out_dir) if stats is None else stats
    features, scores, n = scan(out_dir)
    tars = _tars(out_dir)
    norm = os.path.normpath(out_dir)
    ref = os.path.basename(norm) if os.path.isabs(norm) else norm.replace(os.sep, "/")
    selection = [x for k in sorted(stats) if k not in _OWN for x in render_value(k, stats[k])]
    lines = [*_summary(name, n, len(tars)), *_counts(stats), "", "## Selection", "", *selection, "",
             *_models(models), *_histogram_section(scores, stats.get("histograms")), *_gallery(out_dir, gallery),
             *_how_to_load(ref, tars)]
    return front_matter(stats, features, n, name, license) + "\n" + "\n".join(lines)


def read_stats(out_dir: str) -> dict:
    path = os.path.join(out_dir, STATS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the assemble stage first (stats.json is written last)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): rerun the assemble stage") from e


def write_card(out_dir, stats: dict | None = None, models: dict | None = None, gallery=None,
               name: str | None = None, license: str = "other") -> str:
    """Write ``out_dir/README.md`` atomically; returns its path."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir} is not a folder: run the assemble stage first")
    path = os.path.join(os.fspath(out_dir), CARD)
    write_bytes_atomic(path, render_card(out_dir, stats, models, gallery, name, license).encode("utf-8"))
    return path
