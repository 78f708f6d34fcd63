"""The assemble stage: the four CapFilt-part settings (Table 1), provenance, loadability, stats."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_capfilt import (  # noqa: F401
    HUMAN,
    WEB,
    damaged_fixture,
    damaged_results_fixture,
    files_state,
    read_members,
    temporaries,
    world_fixture,
    write_members,
)

from blip.capfilt.assemble import assemble
from blip.capfilt.config import PARTS, AssembleConfig
from blip.data.loader import make_loader
from blip.data.shards import count_shards, resolve_shards
from blip.params import ParamsError, build

NAMES = ["00000.parquet", "00001.parquet", "00002.parquet"]
QUIET = {"progress": False}  # AssembleConfig has no device


def score_rows(folder) -> dict[str, dict]:
    return {r["key"]: r for n in NAMES for r in pq.read_table(os.path.join(folder, n)).to_pylist()}


def out_samples(out) -> list[dict]:
    """Every sample of the assembled shards: key, its .json, its .txt, its image bytes."""
    found = []
    for key, fields in (s for url in resolve_shards(out) for s in read_members(url)):
        found.append({"key": key, "meta": json.loads(fields["json"]), "txt": fields["txt"].decode(), "jpg": fields["jpg"]})
    return found


@pytest.fixture(scope="module")
def median_threshold(world) -> float:
    """A cut through the middle of the (random-init) filter's web scores, so both sides are populated."""
    p = sorted(r["itm_web"] for r in score_rows(world.scores).values())
    return (p[len(p) // 2 - 1] + p[len(p) // 2]) / 2


@pytest.mark.parametrize("parts", list(PARTS))
def test_four_capfilt_settings_count_what_they_keep(world, tmp_path, median_threshold, parts):
    cfg = AssembleConfig.for_parts(parts, threshold=median_threshold, **QUIET)
    out = tmp_path / "boot"
    stats = assemble(cfg, world.human, world.web, world.scores, out)
    use_filter, use_captioner = PARTS[parts]
    scores = score_rows(world.scores)
    n_web = sum(r["itm_web"] >= cfg.threshold for r in scores.values()) if use_filter else WEB
    n_syn = (sum(r["itm_syn"] >= cfg.threshold for r in scores.values()) if use_filter else WEB) if use_captioner else 0
    src = stats["sources"]
    assert (src["human"]["input"], src["human"]["kept"], src["human"]["dropped"]) == (HUMAN, HUMAN, 0)
    assert (src["web"]["input"], src["web"]["kept"], src["web"]["dropped"]) == (WEB, n_web, WEB - n_web)
    assert (src["synthetic"]["input"], src["synthetic"]["kept"]) == (WEB if use_captioner else 0, n_syn)
    for s in src.values():
        assert s["input"] == s["kept"] + s["dropped"] == s["kept"] + sum(s["dropped_by"].values())
    if use_filter:
        assert 0 < n_web < WEB and src["web"]["dropped_by"] == {"filter": WEB - n_web}
    assert stats["parts"] == parts and stats["texts"] == {"human": 5 * HUMAN, "web": n_web, "synthetic": n_syn,
                                                          "total": 5 * HUMAN + n_web + n_syn}
    assert json.loads((out / "stats.json").read_text()) == {k: v for k, v in stats.items() if k != "run"}

    # the shards hold exactly that, and say where each text came from
    samples = out_samples(out)
    assert len(samples) == stats["samples"] == HUMAN + n_web + n_syn
    assert Counter(s["meta"]["caption_source"] for s in samples) == Counter(
        {k: v for k, v in {"human": HUMAN, "web": n_web, "synthetic": n_syn}.items() if v})
    web_by_key = {k[0]: dict(k[1]) for k in read_members(world.web / "00001.tar")}
    for s in samples:
        m = s["meta"]
        assert len(s["key"]) == 9 and s["key"].isdigit() and m["key"] == s["key"] and m["caption"] == s["txt"]
        assert "noise" not in m  # evaluation-only labels never reach the new training data
        if m["caption_source"] == "human":
            assert len(m["captions"]) == 5 and m["itm"] is None and m["orig_shard"] == "human/00000.tar"
            continue
        r = scores[m["orig_key"]]
        which = "web" if m["caption_source"] == "web" else "syn"
        assert s["txt"] == r[f"{which}_text"] and m["itm"] == pytest.approx(r[f"itm_{which}"])
        assert m["itc"] == pytest.approx(r[f"itc_{which}"]) and m["orig_shard"] == f"web/0000{m['orig_key'][4]}.tar"
        if not use_filter:
            continue
        assert r[f"itm_{which}"] >= cfg.threshold
        if m["orig_shard"] == "web/00001.tar":
            assert s["jpg"] == web_by_key[m["orig_key"]]["jpg"]  # the image itself, byte for byte
    # both texts of one image: adjacent samples, one image_id; image ids unique across images
    by_image = Counter((m["meta"]["orig_shard"], m["meta"]["orig_key"]) for m in samples)
    ids = {(m["meta"]["orig_shard"], m["meta"]["orig_key"]): set() for m in samples}
    for m in samples:
        ids[(m["meta"]["orig_shard"], m["meta"]["orig_key"])].add(m["meta"]["image_id"])
    assert all(len(v) == 1 for v in ids.values()) and len({next(iter(v)) for v in ids.values()}) == len(ids)
    assert stats["images"] == len(by_image)

    # re-pretraining reads it: every image once in evaluation order, every pair in a training epoch
    loader = make_loader(out, batch_size=16, train=False)
    batches = list(loader)
    assert loader.stats.used == len(samples) and loader.stats.skipped == {}
    assert sum(len(b["key"]) for b in batches) == len(samples)
    assert sum(c.pairs for c in count_shards(resolve_shards(out)).values()) == stats["texts"]["total"]
    train = make_loader(out, batch_size=8, train=True, image_size=32)
    assert train.num_items == stats["texts"]["total"] and len(next(iter(train))["text"]) == 8


def test_noise_ratio_from_a_hand_made_score_table(world, tmp_path):
    """Known scores in, known ratios out: noise ratio = synthetic texts under the threshold / scored."""
    scores = tmp_path / "scores"
    scores.mkdir()
    syn_p = iter([0.1, 0.49, 0.5, 0.51, 0.9] * 12)  # per 5 images: 2 under 0.5
    web_p = iter([0.2, 0.8, 0.7] * 20)  # per 3 images: 1 under 0.5
    expect = Counter()
    for n in NAMES:
        keys = [k for k, _ in read_members(world.web / n.replace(".parquet", ".tar"))]
        rows = []
        for i, k in enumerate(keys):
            r = {"key": k, "web_text": f"web text {k}", "syn_text": f"synthetic text {k}", "itm_web": next(web_p),
                 "itm_syn": next(syn_p), "status": "ok"}
            if n == "00001.parquet" and i == 0:  # unusable image: no text, no score
                r.update(web_text=None, syn_text=None, itm_web=None, itm_syn=None, status="undecodable_image")
            elif n == "00001.parquet" and i == 1:  # empty synthetic caption: not a text
                r.update(syn_text=None, itm_syn=None)
            for c in ("itm_logit_web", "itm_logit_syn", "itc_web", "itc_syn"):
                r[c] = None if r["status"] != "ok" else 0.0
            expect["syn_scored"] += r["itm_syn"] is not None
            expect["syn_low"] += r["itm_syn"] is not None and r["itm_syn"] < 0.5
            expect["web_scored"] += r["itm_web"] is not None
            expect["web_low"] += r["itm_web"] is not None and r["itm_web"] < 0.5
            rows.append(r)
        pq.write_table(pa.Table.from_pylist(rows), scores / n)
    stats = assemble(AssembleConfig(**QUIET), world.human, world.web, scores, tmp_path / "boot")
    assert (expect["syn_scored"], expect["syn_low"]) == (58, 22) and (expect["web_scored"], expect["web_low"]) == (59, 20)
    assert stats["noise_ratio"] == pytest.approx(22 / 58) and stats["web_drop_ratio"] == pytest.approx(20 / 59)
    syn, web = stats["sources"]["synthetic"], stats["sources"]["web"]
    assert syn == {"input": 59, "kept": 36, "dropped": 23, "dropped_by": {"empty_caption": 1, "filter": 22}}
    assert web == {"input": 60, "kept": 39, "dropped": 21, "dropped_by": {"filter": 20, "undecodable_image": 1}}
    # the ratio describes the captioner/filter pair: the same whether or not the filter is applied
    none = assemble(AssembleConfig.for_parts("captioner", **QUIET), world.human, world.web, scores, tmp_path / "b2")
    assert none["noise_ratio"] == stats["noise_ratio"] and none["sources"]["synthetic"]["kept"] == 58


def test_rerun_skips_threshold_change_redoes_and_leaves_no_stale_shards(world, tmp_path, median_threshold):
    out = tmp_path / "boot"
    first = assemble(AssembleConfig(threshold=median_threshold, **QUIET), world.human, world.web, world.scores, out)
    tars = files_state(out, "*.tar")
    again = assemble(AssembleConfig(threshold=median_threshold, workers=2, **QUIET), world.human, world.web,
                     world.scores, out)
    assert (again["run"]["done"], again["run"]["skipped_existing"]) == (0, 4) and files_state(out, "*.tar") == tars
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in first.items() if k != "run"}
    # a new threshold: no rescoring (the score tables are untouched), the web shards are re-assembled
    scores_before = files_state(world.scores)
    higher = assemble(AssembleConfig(threshold=0.99, **QUIET), world.human, world.web, world.scores, out)
    assert files_state(world.scores) == scores_before and higher["run"]["done"] == 4
    assert higher["sources"]["web"]["kept"] == higher["sources"]["synthetic"]["kept"] == 0
    # fewer parts -> fewer samples; nothing of the earlier runs is left for the loader to find
    assert len(out_samples(out)) == higher["samples"] == HUMAN and higher["shards"] == 1
    assert sorted(os.listdir(out)) == ["00000.tar", "00000_stats.json", "manifest", "sizes.json", "stats.json"]
    assert temporaries(out) == [] and temporaries(out / "manifest") == []


def test_small_output_shards_and_parallel_workers(world, tmp_path):
    out = tmp_path / "boot"
    stats = assemble(AssembleConfig.for_parts("captioner", max_shard_samples=15, workers=2, **QUIET),
                     world.human, world.web, world.scores, out)
    sizes = json.loads((out / "sizes.json").read_text())
    assert stats["samples"] == HUMAN + 2 * WEB and sum(sizes.values()) == stats["samples"]
    assert max(sizes.values()) <= 15 and stats["shards"] == len(sizes) == 2 + 3 * 3
    assert len({s["key"] for s in out_samples(out)}) == stats["samples"]  # keys unique across shards


def test_damaged_inputs_are_accounted_for(damaged, damaged_results, world, tmp_path):
    _, scores, _, _ = damaged_results
    stats = assemble(AssembleConfig.for_parts("captioner", **QUIET), world.human, damaged, scores, tmp_path / "boot")
    web = stats["sources"]["web"]
    assert web["input"] == WEB == web["kept"] + web["dropped"]  # 60 from the metadata, however many were readable
    by = web["dropped_by"]
    assert by["undecodable_image"] == 1 and by["missing_image"] == 1 and by["truncated_tar"] == 1
    assert by["unread_after_damage"] == 20 - pq.read_metadata(scores / "00002.parquet").num_rows
    assert stats["sources"]["synthetic"]["input"] == web["kept"]
    assert len(out_samples(tmp_path / "boot")) == stats["samples"]


def test_guards_and_config(world, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="assemble did not write"):
        assemble(AssembleConfig(**QUIET), world.human, world.web, world.scores, foreign)
    with pytest.raises(ValueError, match="input shard folder"):
        assemble(AssembleConfig(**QUIET), world.human, world.web, world.scores, world.web)
    with pytest.raises(FileNotFoundError, match="run the filter stage"):
        assemble(AssembleConfig(**QUIET), world.human, world.web, tmp_path / "no_scores", tmp_path / "boot")
    no_syn = tmp_path / "scores"
    shutil.copytree(world.scores, no_syn)
    for n in NAMES:  # a score table without synthetic texts (the filter ran without captions)
        t = pq.read_table(no_syn / n)
        t = t.set_column(t.column_names.index("syn_text"), "syn_text", pa.nulls(t.num_rows, pa.string()))
        pq.write_table(t.replace_schema_metadata({}), no_syn / n)
    with pytest.raises(ValueError, match="no synthetic-caption scores"):
        assemble(AssembleConfig(**QUIET), world.human, world.web, no_syn, tmp_path / "boot2")
    assert build(AssembleConfig, {"use_captioner": False}, "assemble").parts == "filter"
    with pytest.raises(ParamsError, match="threshold"):
        build(AssembleConfig, {"threshold": 1.5}, "assemble")


def test_warns_when_the_filter_drops_nearly_everything(world, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="blip.capfilt"):
        stats = assemble(AssembleConfig(threshold=0.99, **QUIET), world.human, world.web, world.scores, tmp_path / "b")
    assert stats["web_drop_ratio"] == 1.0 and "is it trained?" in caplog.text


def test_itc_filter_drops_as_many_texts_as_itm_the_lowest_cosines(world, tmp_path, median_threshold):
    """capfilt.filter_score: itc — DataComp's CLIP-score filter, compared with ITM at equal kept count."""
    itm = assemble(AssembleConfig(threshold=median_threshold, **QUIET), world.human, world.web, world.scores,
                   tmp_path / "itm")
    itc = assemble(AssembleConfig(threshold=median_threshold, score="itc", **QUIET), world.human, world.web,
                   world.scores, tmp_path / "itc")
    dropped = {s: itm["sources"][s]["dropped_by"].get("filter", 0) for s in ("web", "synthetic")}
    dropped_itc = {s: itc["sources"][s]["dropped_by"].get("filter", 0) for s in ("web", "synthetic")}
    assert sum(dropped.values()) > 0 and sum(dropped_itc.values()) == sum(dropped.values())
    assert itc["score"] == "itc" and itc["itc_cut"]["n_drop"] == sum(dropped.values())
    cut = itc["itc_cut"]["cut"]
    scores = score_rows(world.scores)
    kept = {m["meta"]["orig_key"] + m["meta"]["caption_source"] for m in out_samples(tmp_path / "itc")}
    for key, r in scores.items():
        if r["status"] != "ok":
            continue
        for source, col in (("web", "itc_web"), ("synthetic", "itc_syn")):
            if r[col] is not None:  # kept exactly when the cosine clears the global cut
                assert ((key + source) in kept) == (r[col] >= cut), (key, source, r[col], cut)


def test_itc_cut_edges():
    from blip.capfilt.selection import itc_cut

    t = pa.table({"status": ["ok", "ok", "bad"], "web_text": ["a", "b", None], "syn_text": ["c", None, None],
                  "itm_web": [0.9, 0.2, None], "itm_syn": [0.7, None, None], "itc_web": [0.1, 0.3, None],
                  "itc_syn": [0.2, None, None]})
    assert itc_cut([t], threshold=0.5) == {"cut": pytest.approx(0.15), "n_texts": 3, "n_drop": 1}
    assert itc_cut([t], threshold=0.1)["cut"] == float("-inf")
    assert itc_cut([t], threshold=0.95)["cut"] == float("inf")
    assert itc_cut([t], threshold=0.5, use_captioner=False) == {"cut": pytest.approx(0.2), "n_texts": 2, "n_drop": 1}


def test_oracle_keeps_exactly_the_clean_web_texts_and_the_filter_decides_the_synthetic(world, tmp_path,
                                                                                      median_threshold):
    """capfilt.filter_score: oracle — the ceiling's instrument: the hidden labels decide the web texts."""
    from blip.data.labels import noise_labels

    labels = noise_labels(world.web)
    assert 0 < sum(v is not None for v in labels.values()) < WEB  # both kinds present
    stats = assemble(AssembleConfig(threshold=median_threshold, score="oracle", **QUIET), world.human, world.web,
                     world.scores, tmp_path / "oracle")
    kept = {(m["meta"]["orig_key"], m["meta"]["caption_source"]) for m in out_samples(tmp_path / "oracle")}
    scores = score_rows(world.scores)
    for key, r in scores.items():
        assert ((key, "web") in kept) == (labels[key] is None), (key, labels[key])  # clean kept, noisy dropped
        assert ((key, "synthetic") in kept) == (r["itm_syn"] >= median_threshold)  # the ITM rule
    web = stats["sources"]["web"]
    n_noisy = sum(v is not None for v in labels.values())
    assert (web["kept"], web["dropped_by"]) == (WEB - n_noisy, {"noise_label": n_noisy})
    assert stats["sources"]["synthetic"]["input"] == WEB
    assert stats["score"] == "oracle" and "evaluation instrument" in stats["web_decided_by"]
    from blip.evaluate.report import dataset_table

    assert "an evaluation instrument, not a filter" in dataset_table(stats)
    assert all("noise" not in m["meta"] for m in out_samples(tmp_path / "oracle"))  # the labels stay out of the data


def test_oracle_without_noise_labels_fails_instead_of_keeping_everything(world, tmp_path):
    """Real img2dataset web shards carry no labels: no labels, no oracle."""
    web = tmp_path / "web"
    web.mkdir()
    for n in NAMES:
        samples = read_members(world.web / n.replace(".parquet", ".tar"))
        for _, fields in samples:
            meta = json.loads(fields["json"])
            meta.pop("noise")
            fields["json"] = json.dumps(meta).encode()
        write_members(web, int(n[:5]), samples, len(samples))
    with pytest.raises(ValueError, match=r"filter_score=oracle .* has no 'noise' label .* No labels, no oracle"):
        assemble(AssembleConfig(score="oracle", **QUIET), world.human, web, world.scores, tmp_path / "boot")
    assert not (tmp_path / "boot").exists()  # refused before any work
    # without the filter (parts none/captioner) nothing is decided, so nothing needs the labels
    stats = assemble(AssembleConfig.for_parts("captioner", score="oracle", **QUIET), world.human, web, world.scores,
                     tmp_path / "b2")
    assert stats["sources"]["web"]["kept"] == WEB and "web_decided_by" not in stats
