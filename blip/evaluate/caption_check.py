"""The caption checker: is a caption TRUE of its image's scene? An evaluation instrument.

The captioner's job is to describe the image correctly; in the generated world we know each web
image's scene, so every synthetic caption can be checked against it — the true noise ratio of the
synthetic texts, which the paper could only estimate through the filter (Table 2's "noise ratio"
is the fraction the filter rejects). Beside it this module measures the filter on synthetic
texts: the ROC-AUC of ITM p(match) for true against false captions, and what a threshold keeps.

Parsing is ``caption_parse.parse_caption``; checking compares what a caption claims with the
scene. Reading the scene of a web image (:func:`scene_of_web`) regenerates hidden truth from the
generator's config, like ``blip.data.labels.noise_labels`` reads the noise labels: evaluation
only, never training, captioning or filtering (``tests/test_data_noise_isolation.py`` lists every
caller). :func:`check_synthetic` is the one that reads score tables and scenes together.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

import numpy as np

from ..capfilt.config import DEFAULT_THRESHOLD
from ..data.world import Scene
from .caption_parse import CaptionGroup, ParsedCaption, parse_caption

CORRECT = "correct"
# Error kinds in precedence order: a caption's label is the first that applies.
CHECK_LABELS = ("unparseable", "missing_object", "extra_object", "wrong_shape", "wrong_colour", "wrong_count",
                "wrong_size", "wrong_relation", "wrong_position", "wrong_background")
_GROUP_FIELDS = (("wrong_shape", "shape"), ("wrong_colour", "colour"), ("wrong_count", "count"), ("wrong_size", "size"))

__all__ = ["CHECK_LABELS", "CORRECT", "CaptionGroup", "ParsedCaption", "parse_caption", "check_caption",
           "check_parsed", "objects_right", "scene_of_web", "generator_config", "check_synthetic",
           "NotGeneratedWorld", "NoSyntheticCaptions"]


def _errors(p: ParsedCaption, scene: Scene, order: tuple[int, ...]) -> list[tuple[str, str]]:
    """(label, detail) of every wrong claim when caption group ``i`` is scene group ``order[i]``,
    in ``CHECK_LABELS`` order."""
    errs = []
    for label, field in _GROUP_FIELDS:
        for i, cg in enumerate(p.groups):
            said, true = getattr(cg, field), getattr(scene.groups[order[i]], field)
            if said is not None and said != true:
                errs.append((label, f"group {i + 1}: caption says {field} {said!r}, the scene has {true!r}"))
    if p.relation is not None and (p.relation != scene.layout or order != (0, 1)):
        errs.append(("wrong_relation", f"caption says {_claim(p.groups, p.relation)}; the scene has "
                                       f"{_claim(scene.groups, scene.layout)}"))
    if p.position is not None and p.position != scene.layout:
        errs.append(("wrong_position", f"caption says {p.position!r}, the scene has {scene.layout!r}"))
    if p.background is not None and p.background != scene.background:
        errs.append(("wrong_background", f"caption says {p.background!r}, the scene has {scene.background!r}"))
    return errs


def _claim(groups, relation: str) -> str:
    a, b = groups
    return f"{a.colour} {a.shape} {relation.replace('_', ' ')} {b.colour} {b.shape}"


def _orders(n: int) -> tuple[tuple[int, ...], ...]:
    return ((0,),) if n == 1 else ((0, 1), (1, 0))


def check_parsed(p: ParsedCaption | None, scene: Scene) -> tuple[str, str]:
    """:func:`check_caption` of an already parsed caption (``None``: unparseable)."""
    if p is None:
        return "unparseable", "not a sentence of the world's grammar"
    n_said, n_true = len(p.groups), len(scene.groups)
    if n_said != n_true:
        label = "missing_object" if n_said < n_true else "extra_object"
        return label, f"caption names {n_said} group(s), the scene has {n_true}"
    # the matching of caption groups to scene groups with the fewest errors (ties: naming order)
    errs = min((_errors(p, scene, o) for o in _orders(n_true)), key=len)
    if not errs:
        return CORRECT, ""
    errs.sort(key=lambda e: CHECK_LABELS.index(e[0]))
    return errs[0][0], "; ".join(f"{label}: {detail}" for label, detail in errs)


def check_caption(text: str, scene: Scene) -> tuple[str, str]:
    """``(label, detail)``: ``"correct"`` when everything ``text`` says is true of ``scene``, else
    the first error kind of ``CHECK_LABELS`` and a sentence naming every wrong claim.

    Size, position and background count only when said. The caption's groups are matched to the
    scene's the way that gives the fewest errors, so "a blue square right of a red circle" is the
    scene (red circle, blue square, left_of), and "a blue square left of a red circle" of that
    scene is one ``wrong_relation``.
    """
    return check_parsed(parse_caption(text), scene)


def _objects_right(p: ParsedCaption | None, scene: Scene) -> bool:
    if p is None or len(p.groups) != len(scene.groups):
        return False
    key = lambda g: (g.count, g.colour, g.shape)  # noqa: E731
    return any(all(key(cg) == key(scene.groups[o[i]]) for i, cg in enumerate(p.groups)) for o in _orders(len(p.groups)))


def objects_right(text: str, scene: Scene) -> bool:
    """Whether ``text`` names the right objects: every group's count, colour and shape right and
    no group missing or extra (size, layout and background not considered)."""
    return _objects_right(parse_caption(text), scene)


# ---- the hidden truth: a generated web image's scene -------------------------------------------


class NotGeneratedWorld(ValueError):
    """The web shards were not written by ``blip.data.generator``: there are no scenes to check
    captions against."""


class NoSyntheticCaptions(ValueError):
    """The score tables hold no synthetic captions (the filter ran without the caption stage)."""


def _manifest_of(url: str) -> tuple[str, str]:
    """(manifest path, shard path relative to its root) of a generated shard ``<root>/web/N.tar``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(url)))
    return os.path.join(root, "manifest.json"), os.path.relpath(os.path.abspath(url), root).replace(os.sep, "/")


def generator_config(web_shards):
    """The ``GenerateConfig`` that wrote ``web_shards`` (anything ``resolve_shards`` accepts), read
    from the ``manifest.json`` the generator writes in the folder above ``web/``.

    Raises :class:`NotGeneratedWorld` naming the file when there is none, when another program
    wrote it (an importer, img2dataset) or when it does not list the shards as its ``web`` split.
    """
    from ..data.generator import GenerateConfig
    from ..data.shards import resolve_shards
    from ..data.world import WorldConfig

    configs = {}
    for url in resolve_shards(web_shards):
        path, rel = _manifest_of(url)
        hint = ("the caption checker needs the generated world (python -m blip.data generate): real web data has "
                "no scenes to check captions against")
        if not os.path.isfile(path):
            raise NotGeneratedWorld(f"{path} not found beside the web shard {url}: {hint}")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("generator") != "blip.data.generator" or "config" not in manifest:
            raise NotGeneratedWorld(f"{path} was written by {manifest.get('generator')!r}, not blip.data.generator: "
                                    f"{hint}")
        if rel not in ((manifest.get("splits") or {}).get("web") or {}).get("shards", []):
            raise NotGeneratedWorld(f"{path} does not list {url} as a shard of its web split ({rel}): {hint}")
        configs[path] = manifest["config"]
    if len({json.dumps(c, sort_keys=True) for c in configs.values()}) != 1:
        raise ValueError(f"the web shards come from {len(configs)} generated worlds ({sorted(configs)}); check one "
                         "world's web split at a time")
    path, raw = next(iter(configs.items()))
    known = {f.name for f in fields(GenerateConfig)}
    if set(raw) - known:
        raise ValueError(f"{path}: config keys {sorted(set(raw) - known)} unknown to this blip.data.generator; "
                         "regenerate the data with this version (python -m blip.data generate)")
    return GenerateConfig(**{**raw, "world": WorldConfig(**raw["world"])})


def scene_of_web(key: str | int, cfg, split: str = "web") -> Scene:
    """The scene of generated web image ``key`` (img2dataset key: 5-digit shard + 4-digit index in
    the shard) or sample ``index`` (int), exactly as ``generator.make_sample`` drew it under
    ``cfg`` (a ``GenerateConfig``, see :func:`generator_config`). ``split``: another split of the
    same world (``val``: the captioner's recipe is chosen on its images). Hidden truth:
    evaluation only."""
    from ..data.generator import _backgrounds  # the split's backgrounds, as make_sample draws them
    from ..data.world import sample_rngs, sample_scene

    if isinstance(key, str):
        if len(key) != 9 or not key.isdigit() or int(key[5:]) >= cfg.shard_size:
            raise KeyError(f"web key {key!r} is not a key the generator writes with shard_size {cfg.shard_size} "
                           "(5-digit shard + 4-digit index in the shard)")
        index = int(key[:5]) * cfg.shard_size + int(key[5:])
    else:
        index = int(key)
    if not 0 <= index < cfg.size(split):
        raise KeyError(f"{split} sample {key!r} (index {index}) is outside the generated {split} split of "
                       f"{cfg.size(split)} images")
    return sample_scene(sample_rngs(cfg.seed, split, index)[0], cfg.world, _backgrounds(split))


# ---- the synthetic captions of the filter's score tables ---------------------------------------

_COLUMNS = ["key", "status", "web_text", "syn_text", "itm_syn", "itc_syn", "syn_candidates", "itm_cand", "itc_cand"]


def _captions(tables: dict):
    """(key, text, itm, itc) of every synthetic caption, all candidates of an image."""
    for table in tables.values():
        for row in table.to_pylist():
            if row.get("status", "ok") != "ok":
                continue
            if row.get("syn_candidates") is not None:
                n = len(row["syn_candidates"])
                itm, itc = row.get("itm_cand") or [None] * n, row.get("itc_cand") or [None] * n
                yield from ((row["key"], t, p, c) for t, p, c in zip(row["syn_candidates"], itm, itc))
            elif row.get("syn_text"):
                yield row["key"], row["syn_text"], row.get("itm_syn"), row.get("itc_syn")


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def check_synthetic(scores, web_shards, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Every synthetic caption of the filter's score tables (``scores``: its folder or one file,
    read by ``capfilt.records.read_score_tables``) checked against its image's scene, and the
    filter's scores measured against the checker's labels. ``web_shards``: the generated web split
    the scores are of (:func:`generator_config`). Kept = ITM p(match) >= ``threshold`` (§3.3).

    Returns ``threshold, n`` (captions), ``n_images, n_correct, true_noise_ratio`` (fraction of
    captions that are false), ``objects_right`` (fraction naming the right objects),
    ``per_label: {label: {count, fraction, kept, dropped, kept_fraction}}`` for ``correct`` and
    every ``CHECK_LABELS`` kind, and over the captions with a finite ITM score (``n_scored``):
    ``kept, dropped, filter_rejected_ratio`` (dropped / n_scored), ``kept_noise_ratio`` (false
    among kept), ``auc_itm`` (ROC-AUC of p(match) for correct against false captions) and
    ``auc_itc`` (of the ITC cosine) or ``skipped: {"auc_itc": reason}``; ``web_text_correct``: the
    fraction of web texts the checker calls true (about 1 − the web noise rate; a world whose
    manifest does not match its shards shows near 0 and raises).

    Raises :class:`NotGeneratedWorld` (no generator metadata) or :class:`NoSyntheticCaptions`.
    """
    from ..capfilt.records import read_score_tables
    from .filter_quality import roc_auc

    cfg = generator_config(web_shards)
    tables = read_score_tables(scores, columns=_COLUMNS)
    rows = list(_captions(tables))
    if not rows:
        raise NoSyntheticCaptions(f"{os.fspath(scores)}: the score tables hold no synthetic captions (the filter ran "
                                  "without the caption stage's output, capfilt.parts without the captioner)")
    web = _web_texts(tables)
    scenes = {key: scene_of_web(key, cfg) for key in dict.fromkeys([r[0] for r in rows] + [k for k, _ in web])}
    web_ok = _web_text_correct(web, scenes, cfg, scores)
    labels, right = [], []
    for key, text, _, _ in rows:
        p = parse_caption(text)
        labels.append(check_parsed(p, scenes[key])[0])
        right.append(_objects_right(p, scenes[key]))
    labels_a = np.array(labels, dtype=object)
    correct = labels_a == CORRECT
    itm = np.array([_float(r[2]) for r in rows])
    itc = np.array([_float(r[3]) for r in rows])
    scored = np.isfinite(itm)
    kept = scored & (itm >= threshold)
    dropped = scored & ~kept
    per_label = {}
    for label in (CORRECT, *CHECK_LABELS):
        sel = labels_a == label
        per_label[label] = {"count": int(sel.sum()), "fraction": _ratio(int(sel.sum()), len(rows)),
                            "kept": int((sel & kept).sum()), "dropped": int((sel & dropped).sum()),
                            "kept_fraction": _ratio(int((sel & kept).sum()), int((sel & scored).sum()))}
    out = {
        "threshold": float(threshold), "n": len(rows), "n_images": len({r[0] for r in rows}),
        "n_correct": int(correct.sum()), "true_noise_ratio": _ratio(int((~correct).sum()), len(rows)),
        "objects_right": _ratio(sum(right), len(rows)), "per_label": per_label,
        "n_scored": int(scored.sum()), "kept": int(kept.sum()), "dropped": int(dropped.sum()),
        "filter_rejected_ratio": _ratio(int(dropped.sum()), int(scored.sum())),
        "kept_noise_ratio": _ratio(int((kept & ~correct).sum()), int(kept.sum())),
        "auc_itm": roc_auc(itm[scored], correct[scored]),
        "web_text_correct": web_ok,
    }
    has_itc = scored & np.isfinite(itc)
    if has_itc.any():
        out["auc_itc"] = roc_auc(itc[has_itc], correct[has_itc])
    else:
        out["skipped"] = {"auc_itc": "the score tables hold no ITC cosines of the synthetic captions"}
    return out


def _web_texts(tables: dict) -> list[tuple[str, str]]:
    return [(k, t) for table in tables.values() if "web_text" in table.column_names
            for k, t in zip(table.column("key").to_pylist(), table.column("web_text").to_pylist()) if t]


def _web_text_correct(texts: list[tuple[str, str]], scenes: dict[str, Scene], cfg, scores) -> float:
    """Fraction of web texts true of their scenes: about 1 − the noise rate when ``cfg`` is the
    config that drew these shards, near 0 when not (a manifest rewritten by a later run)."""
    if not texts:
        return float("nan")
    frac = sum(check_caption(t, scenes[k])[0] == CORRECT for k, t in texts) / len(texts)
    expected = 1.0 - cfg.noise_rate
    if len(texts) >= 20 and expected >= 0.2 and frac < 0.25 * expected:
        raise ValueError(f"{os.fspath(scores)}: only {frac:.0%} of the web texts are true of the scenes the manifest's "
                         f"config regenerates (expected about {expected:.0%}): the manifest beside the web shards "
                         "does not describe them; regenerate the data (python -m blip.data generate)")
    return frac
