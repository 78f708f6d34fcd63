"""The loader: batch format, per-epoch determinism, node/worker splits, equal epochs, exact stats."""

import torch
from fixtures_data import SMALL_WORLD, small_world_fixture  # noqa: F401 (fixture)

from blip.data.loader import (
    BlipLoader,
    LoaderConfig,
    epoch_shard_order,
    make_loader,
    unit_shards,
)
from blip.data.shards import resolve_shards
from blip.data.transforms import CLIP_MEAN, CLIP_STD


def _keys(loader):
    return [k for b in loader for k in b["key"]]


def test_training_batch_format(small_world):
    loader = make_loader(small_world / "web", batch_size=8, image_size=32)
    b = next(iter(loader))
    assert set(b) == {"image", "text", "captions", "key", "image_id", "shard"}
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    assert len(b["text"]) == len(b["key"]) == len(b["captions"]) == len(b["shard"]) == 8
    assert b["image_id"].dtype == torch.long and b["image_id"].shape == (8,)
    assert all(t == t.lower() and len(t.split(" ")) <= 30 for t in b["text"])  # pre_caption applied
    assert all(len(k) == 9 and k.isdigit() for k in b["key"])
    # CLIP-normalised: a value range that raw [0, 1] pixels cannot have
    assert b["image"].min() < 0 and abs(b["image"].mean()) < 3


def test_eval_reads_every_image_once_in_order_with_all_captions(small_world):
    loader = make_loader(small_world / "val", batch_size=5, train=False)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == SMALL_WORLD["val"]
    assert [len(b["key"]) for b in batches] == [5, 5, 2]  # last batch kept
    assert all(len(c) == 5 for b in batches for c in b["captions"])
    assert all(b["text"][i] == b["captions"][i][0] for b in batches for i in range(len(b["text"])))
    assert [int(i) for b in batches for i in b["image_id"]] == [int(k) for k in keys]
    assert len(loader) == 3
    # eval transform is deterministic
    again = list(make_loader(small_world / "val", batch_size=5, train=False))
    assert torch.equal(batches[0]["image"], again[0]["image"])


def test_eval_image_is_resize_then_clip_normalisation(small_world):
    import io

    from PIL import Image

    from blip.data.tario import iter_shard_samples

    raw = next(iter_shard_samples(str(small_world / "val/00000.tar")))
    img = Image.open(io.BytesIO(raw.fields["jpg"])).convert("RGB")
    b = next(iter(make_loader(small_world / "val", batch_size=1, train=False, image_size=64)))
    px = img.getpixel((10, 20))
    expect = [(px[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c] for c in range(3)]
    assert torch.allclose(b["image"][0, :, 20, 10], torch.tensor(expect), atol=1e-5)


def test_human_training_expands_five_pairs_per_image(small_world):
    loader = make_loader(small_world / "human", batch_size=8, seed=1)
    assert loader.num_items == SMALL_WORLD["human"] * 5 and len(loader) == 15
    batches = list(loader)
    assert len(batches) == 15
    ids = torch.cat([b["image_id"] for b in batches])
    texts = [t for b in batches for t in b["text"]]
    # every caption of an image is a different pair with the same image_id
    per_image = {}
    for i, t in zip(ids.tolist(), texts, strict=True):
        per_image.setdefault(i, set()).add(t)
    assert max(len(v) for v in per_image.values()) >= 3
    # pair-level shuffle: one image's captions do not come in a run
    assert sum(ids[i] == ids[i + 1] for i in range(len(ids) - 1)) < len(ids) // 4


def test_same_epoch_same_batches_next_epoch_new_order(small_world):
    a = make_loader(small_world / "web", batch_size=10, seed=5)
    first = list(a)
    second = list(a)  # a full pass advanced the epoch
    a.set_epoch(0)
    again = list(a)
    keys = lambda bs: [k for b in bs for k in b["key"]]  # noqa: E731
    assert keys(first) == keys(again)
    assert all(torch.equal(x["image"], y["image"]) and x["text"] == y["text"] for x, y in zip(first, again, strict=True))
    assert keys(first) != keys(second)
    # streaming shuffle: an epoch draws from a buffer that spans passes, so it is not an exact
    # permutation, but it covers most of the data
    assert len(set(keys(first))) > 0.6 * 120 and len(set(keys(second))) > 0.6 * 120
    assert epoch_shard_order(list("abcdefgh"), 5, 0) != epoch_shard_order(list("abcdefgh"), 5, 1)


def test_two_ranks_get_disjoint_shards_and_equal_epoch_lengths(small_world):
    urls = resolve_shards(small_world / "web")  # 6 shards of 20
    # one pass (eval): each rank reads its own shards, together all of them
    shards, keys = [set(), set()], [set(), set()]
    for r in range(2):
        for b in BlipLoader(small_world / "web", LoaderConfig(batch_size=7, train=False), rank=r, world_size=2):
            shards[r].update(b["shard"])
            keys[r].update(b["key"])
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(urls)
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 120
    # training: the per-epoch shuffle gives each rank a different shard set every epoch, and every
    # rank yields the same number of batches (else DDP would hang at the epoch end)
    splits = []
    for epoch in range(3):
        order = epoch_shard_order(urls, 2, epoch)
        mine = [set(unit_shards(order, r, 2, 0, 1)[0]) for r in range(2)]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(urls)
        splits.append(frozenset(mine[0]))
        loaders = [BlipLoader(small_world / "web", LoaderConfig(batch_size=7, seed=2), rank=r, world_size=2, epoch=epoch) for r in range(2)]
        lengths = [len(list(loader)) for loader in loaders]
        assert lengths[0] == lengths[1] == len(loaders[0]) == -(-120 // (7 * 2))
    assert len(set(splits)) > 1


def test_more_units_than_shards_splits_by_sample(small_world):
    # val has one shard; 2 ranks x 1 worker -> every rank reads it, keeps alternate samples
    loaders = [make_loader(small_world / "val", rank=r, world_size=2, batch_size=4, train=False) for r in range(2)]
    keys = [set(_keys(loader)) for loader in loaders]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == SMALL_WORLD["val"]
    train = [make_loader(small_world / "val", rank=r, world_size=2, batch_size=4, expand_captions=False) for r in range(2)]
    assert [len(list(t)) for t in train] == [2, 2]  # ceil(12 / 8) per rank


def test_two_workers_stats_are_exact_and_epoch_length_fixed(small_world):
    loader = make_loader(small_world / "web", batch_size=8, num_workers=2, seed=4)
    batches = list(loader)
    per_worker = -(-120 // (8 * 2))
    assert len(batches) == len(loader) == 2 * per_worker
    st = loader.epoch_stats
    st.check()
    assert st.pairs == 8 * len(batches) and st.batches == len(batches) and not st.skipped
    # eval with two workers: every sample exactly once, counts exact
    ev = make_loader(small_world / "web", batch_size=16, num_workers=2, train=False)
    keys = _keys(ev)
    assert len(keys) == len(set(keys)) == 120
    assert ev.epoch_stats.seen == ev.epoch_stats.used == ev.epoch_stats.pairs == 120
    assert ev.stats.seen == 120  # cumulative
    # with workers, an epoch is still a pure function of (seed, epoch)
    again = make_loader(small_world / "web", batch_size=8, num_workers=2, seed=4)
    assert _keys(again) == [k for b in batches for k in b["key"]]


def test_workers_do_not_change_what_eval_reads(small_world):
    k0 = sorted(_keys(make_loader(small_world / "human", batch_size=6, train=False)))
    k2 = sorted(_keys(make_loader(small_world / "human", batch_size=6, train=False, num_workers=2)))
    assert k0 == k2
