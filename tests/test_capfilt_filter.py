"""The filter stage and threshold selection, with a real (tiny, random-init) filter."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_capfilt import (  # noqa: F401
    QUIET,
    damaged_fixture,
    damaged_results_fixture,
    files_state,
    world_fixture,
)

from blip.capfilt.config import FilterConfig
from blip.capfilt.filter import score_shards
from blip.capfilt.selection import decide, select
from blip.checkpoint import load_model
from blip.data.loader import make_loader
from blip.model.scoring import image_embeddings, itm_scores, text_embeddings

NAMES = ["00000.parquet", "00001.parquet", "00002.parquet"]
COLUMNS = ["key", "web_text", "syn_text", "itm_web", "itm_syn", "itm_logit_web", "itm_logit_syn", "itc_web", "itc_syn",
           "status"]


def rows(folder, name):
    return pq.read_table(os.path.join(folder, name)).to_pylist()


def test_scores_equal_scoring_each_pair_directly(world):
    """Stored scores belong to their keys: re-score the loader's pairs one model call at a time."""
    model = load_model(world.filter).eval()
    tok = world.tokenizer
    table = {r["key"]: r for r in rows(world.scores, "00001.parquet")}
    syn = {r["key"]: r["caption"] for r in rows(world.captions, "00001.parquet")}
    assert list(pq.read_table(world.scores / "00001.parquet").column_names) == COLUMNS
    batch = next(iter(make_loader(world.web / "00001.tar", batch_size=20, train=False, image_size=64)))
    emb, feat = image_embeddings(model, batch["image"])
    for which, texts in (("web", batch["text"]), ("syn", [syn[k] for k in batch["key"]])):
        t = tok(texts, max_length=35)
        s = itm_scores(model, emb, t.input_ids, t.attention_mask)
        cos = (feat * text_embeddings(model, t.input_ids, t.attention_mask)).sum(-1)
        for i, key in enumerate(batch["key"]):
            r = table[key]
            assert r[f"{which}_text"] == texts[i]
            assert r[f"itm_{which}"] == pytest.approx(float(s.prob[i]), abs=1e-5)
            assert r[f"itm_logit_{which}"] == pytest.approx(float(s.logit[i]), abs=1e-5)
            assert r[f"itc_{which}"] == pytest.approx(float(cos[i]), abs=1e-5)
    assert all(0.0 <= r["itm_web"] <= 1.0 and r["status"] == "ok" for r in table.values())


def test_one_row_per_sample_and_null_scores_for_skipped(damaged_results):
    _, scores, _, summary = damaged_results
    assert summary["shard_errors"] == {"00002.parquet": "truncated_tar"}
    by_key = {r["key"]: r for r in rows(scores, "00001.parquet")}
    assert len(by_key) == 20
    for key, reason in (("000010003", "undecodable_image"), ("000010005", "missing_image")):
        r = by_key[key]
        assert r["status"] == reason and r["web_text"] is None and r["syn_text"] is None
        assert all(r[c] is None for c in COLUMNS[3:9])
    assert sum(r["itm_web"] is not None and r["itm_syn"] is not None for r in by_key.values()) == 18
    assert summary["status"]["undecodable_image"] == 1 and summary["status"]["missing_image"] == 1


def test_without_captions_scores_web_texts_only(world, tmp_path):
    out = tmp_path / "scores"
    s = score_shards(FilterConfig(**QUIET, batch_size=9), world.filter, world.web, None, out)
    assert s["rows"] == 60
    for n in NAMES:
        got, ref = rows(out, n), rows(world.scores, n)
        assert all(r["syn_text"] is None and r["itm_syn"] is None and r["itc_syn"] is None for r in got)
        # web scores do not depend on the synthetic texts scored beside them or on the batch size
        assert [r["itm_web"] for r in got] == pytest.approx([r["itm_web"] for r in ref], abs=1e-5)
    with pytest.raises(ValueError, match="no synthetic-caption scores"):
        select(out, use_captioner=True)
    assert all(not any(t.column("keep_syn").to_pylist()) for t in select(out, use_captioner=False).values())


def test_threshold_selection_reads_stored_scores_and_never_rescores(world):
    before = files_state(world.scores)
    p_web = [r["itm_web"] for n in NAMES for r in rows(world.scores, n)]
    p_syn = [r["itm_syn"] for n in NAMES for r in rows(world.scores, n)]
    kept = []
    for t in sorted(p_web)[10::20] + [0.0, 1.0]:
        sel = select(world.scores, threshold=t)
        assert sorted(sel) == NAMES
        keep_web = [k for n in NAMES for k in sel[n].column("keep_web").to_pylist()]
        keep_syn = [k for n in NAMES for k in sel[n].column("keep_syn").to_pylist()]
        assert keep_web == [p >= t for p in p_web] and keep_syn == [p >= t for p in p_syn]
        kept.append((t, sum(keep_web)))
    assert files_state(world.scores) == before  # nothing rewritten
    assert [k for _, k in sorted(kept)] == sorted((k for _, k in kept), reverse=True)  # higher cut, fewer kept
    assert 0 < kept[1][1] < 60  # the scores do straddle the cuts
    # without the filter every usable text is kept, whatever the threshold
    none = select(world.scores, threshold=1.0, use_filter=False, use_captioner=False)
    assert all(all(t.column("keep_web").to_pylist()) and not any(t.column("keep_syn").to_pylist()) for t in none.values())


def test_decide_on_a_hand_made_table():
    import pyarrow as pa

    t = pa.table({"key": list("abcd"), "status": ["ok", "ok", "ok", "undecodable_image"],
                  "web_text": ["x", "y", "z", None], "syn_text": ["s", None, "u", None],
                  "itm_web": [0.7, 0.5, 0.2, None], "itm_syn": [0.1, None, 0.9, None]})
    d = decide(t, threshold=0.5)
    assert d.column("keep_web").to_pylist() == [True, True, False, False]  # p >= threshold passes
    assert d.column("keep_syn").to_pylist() == [False, False, True, False]
    assert d.column("syn_pass").to_pylist() == [False, None, True, None]
    d = decide(t, threshold=0.5, use_filter=False)
    assert d.column("keep_web").to_pylist() == [True, True, True, False]
    assert d.column("keep_syn").to_pylist() == [True, False, True, False]


def test_rerun_skips_and_new_captions_or_model_recompute(world, tmp_path):
    out, caps = tmp_path / "scores", tmp_path / "captions"
    shutil.copytree(world.scores, out)
    shutil.copytree(world.captions, caps)
    before = files_state(out)
    assert score_shards(FilterConfig(**QUIET, workers=2), world.filter, world.web, caps, out)["skipped_existing"] == 3
    assert files_state(out) == before
    # a caption table that changed (the caption stage was redone) invalidates that shard's scores only
    t = pq.read_table(caps / "00001.parquet").to_pylist()
    t[0]["caption"] = "a completely different caption"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(caps / "00001.parquet")), caps / "00001.parquet")
    s = score_shards(FilterConfig(**QUIET), world.filter, world.web, caps, out)
    assert (s["done"], s["skipped_existing"]) == (1, 2)
    assert rows(out, "00001.parquet")[0]["syn_text"] == "a completely different caption"
    with pytest.raises(ValueError, match="no ITC/ITM heads"):
        score_shards(FilterConfig(**QUIET), world.captioner, world.web, caps, tmp_path / "x")
    shutil.copy(caps / "00000.parquet", caps / "00002.parquet")  # another shard's captions
    with pytest.raises(RuntimeError, match="does not hold the samples of .*00002.tar"):
        score_shards(FilterConfig(**QUIET), world.filter, world.web, caps, out)
    os.remove(caps / "00002.parquet")
    with pytest.raises(FileNotFoundError, match="run the caption stage"):
        score_shards(FilterConfig(**QUIET), world.filter, world.web, caps, out)


def test_model_in_eval_mode_and_inference_only(world):
    from blip.capfilt.models import InferenceModel

    m = InferenceModel(world.filter, "filter", "auto")
    assert not m.model.training and m.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_filter_quality_reads_the_score_tables(world):
    """The contract with blip.evaluate: it reads ``key``/``itm_web``/``itc_web`` from this folder."""
    from blip.evaluate.filter_quality import evaluate_filter

    fq = evaluate_filter(world.scores, world.web)
    assert fq["n"] == 60 and fq["n_missing"] == 0 and fq["n_unknown"] == 0 and "auc" in fq["itc_baseline"]
