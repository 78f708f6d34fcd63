"""N candidate captions per image and the selection rules (threshold, top_k, fraction, replace),
on the capfilt world's real shards with tiny real models: the caption and filter stages run once
with ``candidates: 4``; each rule is then an assemble over the same score tables."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_capfilt import QUIET as WORKER_QUIET
from fixtures_capfilt import WEB, read_members, world_fixture  # noqa: F401

from blip.capfilt.assemble import assemble
from blip.capfilt.caption import caption_shards, candidate_seed
from blip.capfilt.config import AssembleConfig, CaptionConfig, FilterConfig
from blip.capfilt.filter import score_shards
from blip.capfilt.selection import Rule, decide, fraction_cut, image_texts
from blip.capfilt.models import InferenceModel
from blip.data.shards import resolve_shards

N = 4
NAMES = ["00000.parquet", "00001.parquet", "00002.parquet"]


@pytest.fixture(scope="module")
def cand(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("candidates")
    caption_shards(CaptionConfig(candidates=N, **WORKER_QUIET), world.captioner, world.web, root / "captions")
    score_shards(FilterConfig(**WORKER_QUIET), world.filter, world.web, root / "captions", root / "scores")
    return root


def score_rows(folder) -> list[dict]:
    return [r for n in NAMES for r in pq.read_table(folder / n).to_pylist()]


def out_samples(out) -> list[dict]:
    return [{"meta": json.loads(f["json"]), "txt": f["txt"].decode()}
            for url in resolve_shards(out) for _, f in read_members(url)]


def test_repeats_share_one_prefill_and_equal_separate_draws(world):
    """generate(repeats=N): row i*N+j is what image i alone gives with seed j."""
    m = InferenceModel(str(world.captioner), "captioner", "cpu")
    prompt = m.tokenizer.prompt_ids(m.model.cfg.prompt)
    gen = CaptionConfig().generation()
    torch.manual_seed(0)
    images = torch.randn(3, 3, m.image_size, m.image_size)
    seeds = [candidate_seed(0, "00000.tar", str(i), j) for i in range(3) for j in range(N)]
    with torch.inference_mode():
        together = m.model.generate(images, prompt, gen, seeds=seeds, repeats=N)
        alone = [m.model.generate(images[i:i + 1].expand(N, -1, -1, -1), prompt, gen, seeds=seeds[i * N:(i + 1) * N])
                 for i in range(3)]
    assert together.shape[0] == 3 * N
    for i, a in enumerate(alone):
        got = together[i * N:(i + 1) * N]
        width = max(got.shape[1], a.shape[1])
        pad = m.model.cfg.text.pad_token_id
        assert torch.equal(torch.nn.functional.pad(got, (0, width - got.shape[1]), value=pad),
                           torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad)), i
    with pytest.raises(ValueError, match="beam search gives one caption"):
        CaptionConfig(candidates=2, method="beam")


def test_candidate_zero_is_blips_caption_and_the_tables_carry_every_candidate(world, cand):
    for name in NAMES:
        one = pq.read_table(world.captions / name).to_pylist()
        four = pq.read_table(cand / "captions" / name).to_pylist()
        assert [r["caption"] for r in four] == [r["caption"] for r in one]  # candidate 0 = candidates: 1
        for r in four:
            if r["status"] == "ok":
                assert len(r["candidates"]) == N and r["candidates"][0] == r["caption"]
    rows = score_rows(cand / "scores")
    several = 0
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["cand_drawn"] == N and r["syn_candidates"] and r["syn_text"] == r["syn_candidates"][0]
        assert len(set(r["syn_candidates"])) == len(r["syn_candidates"])  # distinct
        assert len(r["itm_cand"]) == len(r["itc_cand"]) == len(r["syn_candidates"])
        assert r["itm_cand"][0] == r["itm_syn"] and r["itc_cand"][0] == r["itc_syn"]
        several += len(r["syn_candidates"]) > 1
    assert several > len(rows) // 2  # nucleus samples differ


def _run(cand, tmp_path, world, **kw):
    cfg = AssembleConfig(progress=False, **kw)
    out = tmp_path / f"boot-{kw.get('rule', 'threshold')}"
    stats = assemble(cfg, None, world.web, cand / "scores", out)
    return stats, out_samples(out)


def _texts_by_image(rows) -> dict[str, list[dict]]:
    out = {}
    for r in rows:
        if r["status"] == "ok":
            web, cands = image_texts(r)
            out[r["key"]] = ([{**web, "source": "web"}] if web else []) + [{**c, "source": "synthetic"} for c in cands]
    return out


def test_threshold_rule_keeps_every_candidate_that_passes_and_counts_per_candidate(world, cand, tmp_path):
    rows = score_rows(cand / "scores")
    itm = sorted(t["itm"] for ts in _texts_by_image(rows).values() for t in ts)
    threshold = itm[len(itm) // 2]
    stats, samples = _run(cand, tmp_path, world, threshold=threshold)
    usable = sum(r["status"] == "ok" for r in rows)
    syn = stats["sources"]["synthetic"]
    assert stats["candidates"] == N and syn["input"] == N * usable == syn["kept"] + syn["dropped"]
    n_distinct = sum(len(r["syn_candidates"]) for r in rows if r["status"] == "ok")
    assert syn["dropped_by"].get("same_text", 0) + syn["dropped_by"].get("empty_caption", 0) == N * usable - n_distinct
    passing = sum(t["itm"] >= threshold for ts in _texts_by_image(rows).values() for t in ts if t["source"] == "synthetic")
    assert syn["kept"] == passing and all(s["meta"]["itm"] >= threshold for s in samples)
    assert stats["noise_ratio"] == pytest.approx(1 - passing / n_distinct)  # Table 2, per candidate


def test_top_k_keeps_exactly_k_per_image_the_best_by_rank_score(world, cand, tmp_path):
    rows = score_rows(cand / "scores")
    for k in (1, 2):
        stats, samples = _run(cand, tmp_path / str(k), world, rule="top_k", top_k=k, rank_score="itc")
        by_image = defaultdict(list)
        for s in samples:
            by_image[s["meta"]["orig_key"]].append(s["meta"]["itc"])
        texts = _texts_by_image(rows)
        for key, ts in texts.items():
            best = sorted((t["itc"] for t in ts), reverse=True)[:k]
            assert sorted(by_image[key], reverse=True) == pytest.approx(best), key
            assert len(by_image[key]) == min(k, len(ts))
        assert stats["rule"] == {"name": "top_k", "top_k": k, "rank_score": "itc"}


def test_fraction_cut_is_the_exact_quantile_over_all_shards(world, cand, tmp_path):
    rows = score_rows(cand / "scores")
    values = sorted((t["itc"] for ts in _texts_by_image(rows).values() for t in ts), reverse=True)
    stats, samples = _run(cand, tmp_path, world, rule="fraction", fraction=0.3, rank_score="itc")
    n_keep = math.floor(0.3 * len(values) + 0.5)
    assert stats["rule"]["n_texts"] == len(values) and stats["rule"]["n_keep"] == n_keep
    assert stats["rule"]["cut"] == pytest.approx(values[n_keep - 1])
    kept = sorted((s["meta"]["itc"] for s in samples), reverse=True)
    assert kept == pytest.approx(values[:n_keep])  # exactly the best 30% of every shard's texts together
    assert stats["sources"]["web"]["kept"] + stats["sources"]["synthetic"]["kept"] == n_keep
    # the cut is global: one shard's table alone would give another one
    alone = fraction_cut([pq.read_table(cand / "scores" / NAMES[0])], 0.3, "itc")
    assert alone["n_texts"] < len(values)


def test_replace_never_keeps_a_rejected_web_text(world, cand, tmp_path):
    rows = score_rows(cand / "scores")
    itm = sorted(r["itm_web"] for r in rows if r["status"] == "ok")
    threshold = itm[len(itm) // 2]  # half the web texts rejected
    stats, samples = _run(cand, tmp_path, world, rule="replace", threshold=threshold, rank_score="itc")
    by_image = defaultdict(list)
    for s in samples:
        by_image[s["meta"]["orig_key"]].append(s["meta"])
    texts = _texts_by_image(rows)
    replaced = 0
    for key, ts in texts.items():
        got = by_image.get(key, [])
        assert len(got) <= 1  # one text per image
        web = next((t for t in ts if t["source"] == "web"), None)
        passing = [t for t in ts if t["source"] == "synthetic" and t["itm"] >= threshold]
        if web is not None and web["itm"] >= threshold:
            assert [g["caption_source"] for g in got] == ["web"]
        elif passing:
            best = max(passing, key=lambda t: t["itc"])
            assert [(g["caption_source"], g["caption"]) for g in got] == [("synthetic", best["text"])]
            replaced += 1
        else:
            assert got == []
    assert all(g["itm"] >= threshold for g in sum(by_image.values(), []) if g["caption_source"] == "web")
    assert replaced > 0 and stats["sources"]["web"]["dropped_by"]["filter"] == sum(
        1 for ts in texts.values() for t in ts if t["source"] == "web" and t["itm"] < threshold)


def test_rules_are_config_errors_when_they_cannot_apply():
    with pytest.raises(ValueError, match="use one of"):
        AssembleConfig(rule="best")
    with pytest.raises(ValueError, match="fraction"):
        AssembleConfig(rule="fraction", fraction=0.0)
    with pytest.raises(ValueError, match="oracle"):
        AssembleConfig(rule="top_k", score="oracle")
    with pytest.raises(ValueError, match="cut over all shards"):
        Rule("fraction")


def test_one_caption_tables_decide_as_before(world):
    """Tables without candidates (BLIP's one caption): the threshold rule is the old decide."""
    t = pq.read_table(world.scores / NAMES[0])
    d = decide(t, threshold=0.4).to_pylist()
    for r, x in zip(t.to_pylist(), d):
        ok = r["status"] == "ok"
        assert x["keep_web"] == (ok and bool(r["web_text"]) and r["itm_web"] >= 0.4)
        assert x["keep_syn"] == (ok and bool(r["syn_text"]) and r["itm_syn"] >= 0.4)
