"""A labelled sample of the generated world, as a person would label one: ``labels.csv`` for
``python -m blip calibrate``, its labels taken from the generator's hidden noise labels.

On real data a person marks a few hundred texts; the generated world knows which web captions it
corrupted, so this stands in for that person (and lets the tests check the calibrated precision
against the truth). Only web texts are sampled: a synthetic caption has no ground truth. The
labels are read through ``blip.data.labels.noise_labels`` (the one reader; this is an evaluation
instrument, never a filter), clean -> ``good``, any noise kind -> ``bad``.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pyarrow.compute as pc

from ..atomic import atomic_path
from ..capfilt.records import read_score_tables
from ..data.labels import noise_labels


def labelled_sample(web, scores_dir, n: int = 300, seed: int = 0) -> list[dict]:
    """``n`` web texts drawn uniformly without replacement (``seed``) from the usable, scored
    samples of the score tables of ``scores_dir``, as ``{"key", "text", "label"}`` rows in table
    order; ``text`` is the table's ``web_text``, ``label`` ``good`` (clean) or ``bad``. ``web``: the
    shards the filter scored. Fewer than ``n`` when fewer are scored; raises when none is."""
    if n < 1:
        raise ValueError(f"sample size {n}: must be >= 1")
    candidates = []
    for table in read_score_tables(scores_dir, columns=["key", "status", "web_text", "itm_web"]).values():
        ok, text = pc.equal(table.column("status"), "ok"), pc.not_equal(table.column("web_text"), "")
        usable = pc.fill_null(pc.and_(ok, text), False)
        t = table.filter(usable)
        candidates += zip(t.column("key").to_pylist(), t.column("web_text").to_pylist())
    truth = noise_labels(web)
    labelled = [(k, text) for k, text in candidates if k in truth]
    if not labelled:
        raise ValueError(f"none of the {len(candidates)} scored web texts of {scores_dir} is a sample of {web}: pass "
                         "the web shards the filter stage scored")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(labelled), size=min(n, len(labelled)), replace=False))
    return [{"key": labelled[i][0], "text": labelled[i][1], "label": "good" if truth[labelled[i][0]] is None else "bad"}
            for i in pick]


def write_labels(rows: list[dict], path: str | os.PathLike) -> None:
    """Write ``rows`` as a ``key,text,label`` CSV (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["key", "text", "label"])
        w.writeheader()
        w.writerows(rows)
