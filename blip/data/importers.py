"""Real data into the same layout as the generated world.

- ``import_coco_karpathy``: COCO images + Karpathy's ``dataset_coco.json`` -> ``human/``
  (train + restval, as BLIP trains), ``val/``, ``test/`` shards + ``annotations/{val,test}_gt.json``.
- ``import_flickr_karpathy``: Flickr30k images + ``dataset_flickr30k.json`` -> ``human/``, ``val/``,
  ``test/`` (or, with ``as_zeroshot``, only the test split as ``zeroshot/``: the paper's zero-shot
  transfer setting).
- An img2dataset output folder needs no import: point the loader (or ``inspect_shards``) at it.

Karpathy JSON: ``{"images": [{"filepath"?, "filename", "split", "cocoid"?, "imgid",
"sentences": [{"raw", "tokens"}, ...]}, ...]}``, checked entry by entry before anything is
written. Image bytes are copied unchanged when they are JPEG and no ``max_side`` is asked for,
else re-encoded as JPEG (quality 95).

Nothing is lost silently: images that are missing, unreadable, undecodable or have no caption are
skipped, counted by reason and listed one per line in ``<split>/skipped.jsonl``; the import fails
when none of a split's images is found (a wrong image root) or when more than
``max_skipped_fraction`` of the images are skipped. The output folder is replaced in one step
(``staged_output_dir``), so a rerun never mixes old and new shards and a failed run leaves the
previous output as it was.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from ..atomic import atomic_dir
from . import layout
from .coco import build_gt, write_gt
from .progress import progress_bar
from .shards import (
    MAX_SHARD_SIZE,
    count_shards,
    dumps,
    make_key,
    resolve_shards,
    sample_members,
    write_shard,
    write_sizes,
)

COCO_SPLITS = {"train": "human", "restval": "human", "val": "val", "test": "test"}
FLICKR_SPLITS = {"train": "human", "val": "val", "test": "test"}
GT_SPLITS = ("val", "test", "zeroshot")
# COCO's and Flickr30k's images are all on disk once downloaded: a few percent skipped already
# means a partial download or a wrong folder, not the odd broken file
MAX_SKIPPED_FRACTION = 0.05
SKIPPED_LIST = "skipped.jsonl"  # in each split folder: one JSON line per skipped image
KARPATHY_FORMAT = ('Karpathy\'s dataset_coco.json / dataset_flickr30k.json format: {"images": [{"filename": str, '
                   '"split": str, "sentences": [{"raw": str, "tokens": [str, ...]}, ...], "filepath"?, "cocoid"?, '
                   '"imgid"}, ...]}')


def _read_image(path: str, max_side: int | None) -> tuple[bytes, int, int, int, int] | str:
    """(jpeg bytes, width, height, original width, original height) or a skip reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return "missing_file"
    except OSError:  # there but not readable: permissions, a folder of that name, an I/O error
        return "unreadable_file"
    try:
        img = Image.open(io.BytesIO(data))
        ow, oh = img.size
        fmt = img.format
        if fmt == "JPEG" and (max_side is None or max(ow, oh) <= max_side) and img.mode in ("RGB", "L"):
            img.verify()  # catches truncated files without decoding every pixel
            return data, ow, oh, ow, oh
        img = img.convert("RGB")
        if max_side is not None and max(ow, oh) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), img.width, img.height, ow, oh
    except Exception:
        return "undecodable_image"


def _captions(entry: dict) -> list[str]:
    caps = []
    for s in entry["sentences"]:  # load_karpathy checked: each has a 'raw' string or a 'tokens' list
        raw = s["raw"] if isinstance(s.get("raw"), str) else " ".join(s["tokens"])
        raw = raw.strip()
        if raw:
            caps.append(raw)
    return caps


def load_karpathy(path: str) -> list[dict]:
    """The ``images`` list of a Karpathy split file, every entry checked.

    A wrong, truncated or hand-edited file fails here with a ``ValueError`` naming the file, the
    entry and the field (``dataset_coco.json: images[12] has no 'sentences' list``), before
    anything is written, rather than as a KeyError halfway through an import.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a truncated or interrupted download? Fetch the file again. "
                         f"Expected {KARPATHY_FORMAT}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level is a {type(data).__name__}, not an object with an 'images' list; "
                         f"expected {KARPATHY_FORMAT}")
    images = data.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{path}: no 'images' list; expected {KARPATHY_FORMAT}")
    problems = [p for i, e in enumerate(images) if (p := _entry_problem(i, e))]
    if problems:
        many = f"{len(problems)} malformed image entries, e.g. " if len(problems) > 1 else ""
        raise ValueError(f"{path}: {many}{'; '.join(problems[:5])}; expected {KARPATHY_FORMAT}")
    return images


def _entry_problem(i: int, e) -> str | None:
    """What is wrong with entry ``images[i]``, or None."""
    if not isinstance(e, dict):
        return f"images[{i}] is a {type(e).__name__}, not an object"
    for k in ("filename", "split"):
        if not isinstance(e.get(k), str) or not e[k]:
            return f"images[{i}] has no '{k}' string"
    if not isinstance(e.get("filepath", ""), str):
        return f"images[{i}] has a 'filepath' that is not a string"
    sentences = e.get("sentences")
    if not isinstance(sentences, list):
        got = "" if sentences is None else f" (got {type(sentences).__name__})"
        return f"images[{i}] has no 'sentences' list{got}"
    for j, s in enumerate(sentences):
        tokens = s.get("tokens") if isinstance(s, dict) else None
        if not isinstance(s, dict) or not (isinstance(s.get("raw"), str)
                                           or (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens))):
            return f"images[{i}].sentences[{j}] has neither a 'raw' string nor a 'tokens' list"
    return None


def import_karpathy(
    karpathy_json: str,
    image_root: str,
    out_dir: str,
    split_map: dict[str, str],
    image_id_key: str | None,
    shard_size: int = 1000,
    max_side: int | None = None,
    progress: bool = True,
    source: str = "karpathy",
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> dict:
    """Shards + GT from a Karpathy split file; returns the summary written to ``manifest.json``
    (plus ``skipped_examples``: the first skipped images, and ``timing``).

    ``split_map``: Karpathy split -> output split (unlisted splits are ignored).
    ``image_id_key``: entry field holding the image id (``cocoid``); None: the file name's digits
    (Flickr ``1000092795.jpg``), else ``imgid``.
    ``max_skipped_fraction``: fail, writing nothing, when more of the listed images than this are
    skipped. The output splits (and their GT) replace those in ``out_dir``; other splits already
    there are kept (README: Flickr30k's test split imported as ``zeroshot/`` beside COCO's).
    """
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size={shard_size}: must be in 1..{MAX_SHARD_SIZE}")
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"max_skipped_fraction={max_skipped_fraction}: must be in 0..1")
    images = load_karpathy(karpathy_json)
    t0 = time.perf_counter()
    by_split: dict[str, list[tuple[int, dict, int]]] = {}  # output split -> (index in images, entry, image id)
    bad_ids = []
    for index, e in enumerate(images):
        out_split = split_map.get(e["split"])
        if out_split is not None:
            image_id = _image_id(e, image_id_key)
            if image_id is None:
                bad_ids.append(_no_id(index, e, image_id_key))
            by_split.setdefault(out_split, []).append((index, e, image_id))
    if bad_ids:
        many = f"{len(bad_ids)} image entries without an id, e.g. " if len(bad_ids) > 1 else ""
        raise ValueError(f"{karpathy_json}: {many}{'; '.join(bad_ids[:5])}; expected {KARPATHY_FORMAT}")
    if not by_split:
        found = sorted({e["split"] for e in images})
        raise ValueError(f"{karpathy_json}: no image in the splits {sorted(split_map)} this import reads "
                         f"(found {', '.join(map(repr, found)) or 'no images at all'}); expected {KARPATHY_FORMAT}")
    # missing files are known before anything is read or written: fail fast on a wrong image root
    _check_skipped(karpathy_json, image_root, out_dir, by_split, _skips_known_upfront(by_split, image_root), max_skipped_fraction)

    replaced = ["manifest.json", *by_split, *(layout.gt_path("", s) for s in by_split if s in GT_SPLITS)]
    skipped: dict[str, list[dict]] = {}
    summary: dict = {}
    with staged_output_dir(out_dir, replaced) as tmp:
        bar = progress_bar(sum(len(v) for v in by_split.values()), progress, "import")
        for out_split, entries in by_split.items():
            writer = _SplitWriter(os.path.join(tmp, out_split), shard_size)
            gt_images, gt_caps, skipped[out_split] = [], {}, []
            for index, e, image_id in entries:
                bar.update(1)
                rel = os.path.join(e.get("filepath", ""), e["filename"])
                caps = _captions(e)
                got = _read_image(os.path.join(image_root, rel), max_side) if caps else "no_captions"
                if isinstance(got, str):
                    skipped[out_split].append(_skip_row(index, e, image_id, image_root, got))
                    continue
                data, w, h, ow, oh = got
                key, shard_name = writer.next_key()
                meta = {"key": key, "caption": caps[0], "captions": caps, "image_id": image_id, "url": rel,
                        "status": "success", "error_message": None, "width": w, "height": h,
                        "original_width": ow, "original_height": oh, "exif": None, "source": source}
                if out_split in GT_SPLITS:
                    gt_images.append({"id": image_id, "file_name": rel, "width": ow, "height": oh, "key": key,
                                      "shard": f"{out_split}/{shard_name}"})
                    gt_caps[image_id] = caps
                writer.add(sample_members(key, data, caps[0], meta), len(caps))
            writer.close()
            with open(os.path.join(tmp, out_split, SKIPPED_LIST), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in skipped[out_split])
            info = {"shards": [f"{out_split}/{k}" for k in sorted(writer.sizes)], "images": writer.images,
                    "pairs": writer.pairs, "source": os.path.abspath(karpathy_json),
                    "skipped": dict(Counter(r["reason"] for r in skipped[out_split])),
                    "skipped_list": f"{out_split}/{SKIPPED_LIST}"}
            if out_split in GT_SPLITS:
                gt_path = layout.gt_path(tmp, out_split)
                write_gt(gt_path, build_gt(gt_images, gt_caps, f"{source} {out_split} from {os.path.basename(karpathy_json)}"))
                info["gt"] = os.path.relpath(gt_path, tmp)
            summary[out_split] = info
        bar.close()
        _check_skipped(karpathy_json, image_root, out_dir, by_split, skipped, max_skipped_fraction)
        all_skipped = [r for rows in skipped.values() for r in rows]
        manifest = {"generator": f"blip.data.importers ({source})", "format": "img2dataset-webdataset",
                    "source": os.path.abspath(karpathy_json), "splits": {**previous_splits(out_dir, by_split), **summary},
                    "skipped": dict(Counter(r["reason"] for r in all_skipped))}
        with open(os.path.join(tmp, "manifest.json"), "wb") as f:
            f.write(dumps(manifest))
    return {**manifest, "skipped_examples": all_skipped[:5],
            "skipped_lists": [info["skipped_list"] for info in summary.values() if info["skipped"]],
            "timing": {"seconds": round(time.perf_counter() - t0, 2)}}


def _skip_row(index: int, e: dict, image_id: int, image_root: str, reason: str) -> dict:
    """One line of ``skipped.jsonl``: where the image is in the Karpathy file and on disk, and why."""
    rel = os.path.join(e.get("filepath", ""), e["filename"])
    return {"index": index, "split": e["split"], "file": rel, "path": os.path.abspath(os.path.join(image_root, rel)),
            "image_id": image_id, "reason": reason}


def _skips_known_upfront(by_split: dict, image_root: str) -> dict[str, list[dict]]:
    """Per output split, the entries that will be skipped whatever their bytes: no caption or no file."""
    out = {}
    for out_split, entries in by_split.items():
        out[out_split] = []
        for index, e, image_id in entries:
            if not _captions(e):
                reason = "no_captions"
            elif not os.path.exists(os.path.join(image_root, e.get("filepath", ""), e["filename"])):
                reason = "missing_file"
            else:
                continue
            out[out_split].append(_skip_row(index, e, image_id, image_root, reason))
    return out


def _check_skipped(karpathy_json: str, image_root: str, out_dir: str, by_split: dict, skipped: dict[str, list[dict]],
                   max_fraction: float) -> None:
    """Fail when no image was found (a wrong image root), when a split lost all of its images, or
    when more than ``max_fraction`` of the images were skipped; the messages name the files."""
    rows = [r for split_rows in skipped.values() for r in split_rows]
    total = sum(len(v) for v in by_split.values())
    missing = [r for r in rows if r["reason"] == "missing_file"]
    if missing and len(missing) == total - sum(r["reason"] == "no_captions" for r in rows):
        where = " (that folder does not exist)" if not os.path.isdir(image_root) else ""
        raise FileNotFoundError(
            f"{karpathy_json}: none of the {len(missing)} captioned images it lists were found under the image root "
            f"{image_root}{where}; looked for e.g. {missing[0]['path']}. The image root must be the folder the "
            "file's 'filepath'/'filename' are relative to: for COCO the one holding train2014/ and val2014/, "
            "for Flickr30k the one holding the .jpg files")
    for out_split, entries in by_split.items():
        if len(skipped[out_split]) == len(entries):
            lost = skipped[out_split]
            kind = FileNotFoundError if all(r["reason"] == "missing_file" for r in lost) else ValueError
            raise kind(f"{karpathy_json}: none of the {len(entries)} images of split '{out_split}' could be imported "
                       f"from {image_root}: {_reasons(lost)}. Download the missing images (or fix the broken ones); "
                       f"nothing was written to {out_dir}")
    if len(rows) > max_fraction * total:
        raise ValueError(
            f"{karpathy_json}: {len(rows)} of {total} images were skipped ({len(rows) / total:.1%}), more than "
            f"max_skipped_fraction={max_fraction:g} (--max-skipped-fraction) allows: {_reasons(rows)}. Nothing was "
            f"written to {out_dir}. Put the missing images under {image_root} (or fix the broken ones), or raise "
            f"the fraction to import the rest: each split's {SKIPPED_LIST} then lists every skipped image")


def _reasons(rows: list[dict], examples: int = 3) -> str:
    """``missing_file 812 (e.g. a.jpg, b.jpg, c.jpg), no_captions 1 (e.g. d.jpg)``, most common first."""
    parts = []
    for reason, n in Counter(r["reason"] for r in rows).most_common():
        paths = [r["path"] for r in rows if r["reason"] == reason][:examples]
        parts.append(f"{reason} {n} (e.g. {', '.join(paths)})")
    return ", ".join(parts)


class _SplitWriter:
    """Fills shards of ``shard_size`` samples in ``split_dir``, img2dataset keys, sizes.json."""

    def __init__(self, split_dir: str, shard_size: int):
        self.split_dir, self.shard_size = split_dir, shard_size
        self.shard, self.members, self.n, self.n_pairs = 0, [], 0, 0
        self.sizes: dict[str, int] = {}
        self.images = self.pairs = 0

    def next_key(self) -> tuple[str, str]:
        """(key of the next sample, name of the tar it goes to)."""
        return make_key(self.shard, self.n), f"{self.shard:05d}.tar"

    def add(self, members: list[tuple[str, bytes]], n_pairs: int) -> None:
        self.members += members
        self.n += 1
        self.n_pairs += n_pairs
        self.images += 1
        self.pairs += n_pairs
        if self.n == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self.n:
            path = write_shard(self.split_dir, self.shard, self.members, self.n, self.n_pairs)
            self.sizes[os.path.basename(path)] = self.n
            self.shard += 1
        self.members, self.n, self.n_pairs = [], 0, 0

    def close(self) -> None:
        self._flush()
        write_sizes(self.split_dir, self.sizes)


def _image_id(entry: dict, key: str | None) -> int | None:
    """``entry[key]``, else the file name's number (Flickr), else ``imgid``; None when none is there."""
    if key is not None and isinstance(entry.get(key), int):
        return entry[key]
    stem = os.path.splitext(os.path.basename(entry["filename"]))[0]
    if stem.isdigit():
        return int(stem)
    return entry["imgid"] if isinstance(entry.get("imgid"), int) else None


def _no_id(index: int, entry: dict, key: str | None) -> str:
    first = f"no '{key}' integer, " if key is not None else ""
    return f"images[{index}] has no image id: {first}no number as file name ({entry['filename']!r}), no 'imgid' integer"


def previous_splits(out_dir: str, rewritten) -> dict:
    """Manifest entries of the splits in ``out_dir`` that this run does not rewrite (they are kept)."""
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        old = json.load(f).get("splits", {})
    return {k: v for k, v in old.items() if k not in rewritten and os.path.isdir(os.path.join(out_dir, k))}


@contextmanager
def staged_output_dir(out_dir: str, replaced: list[str]) -> Iterator[str]:
    """A fresh folder beside ``out_dir`` to write into; on success it takes ``out_dir``'s place in
    one step (``blip.atomic.atomic_dir``).

    ``replaced``: paths relative to ``out_dir`` that this run writes anew (split folders, their GT,
    ``manifest.json``); everything else already in ``out_dir`` (other splits, files of the user's)
    is carried over as hard links (copies where the filesystem has none). Readers never see old and
    new shards mixed (a rerun with another shard size used to leave the first run's higher-numbered
    shards, which the loader then read twice). On an exception, Ctrl-C included, the new folder is
    deleted and ``out_dir`` is as it was; folders that a killed run left behind are cleared first.
    """
    with atomic_dir(out_dir) as tmp:
        out = os.path.realpath(out_dir)
        if os.path.isdir(out):
            _carry_over(out, str(tmp), replaced)
        yield str(tmp)


def _carry_over(src: str, dst: str, replaced: list[str]) -> None:
    """Everything in ``src`` but the ``replaced`` paths, hard-linked (or copied) into ``dst``."""
    drop = {os.path.normpath(p) for p in replaced}

    def ignore(folder, names):
        rel = os.path.relpath(folder, src)
        return {n for n in names if os.path.normpath(os.path.join(rel, n)) in drop}

    shutil.copytree(src, dst, symlinks=True, ignore=ignore, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def import_coco_karpathy(karpathy_json: str, image_root: str, out_dir: str, shard_size: int = 1000, max_side: int | None = None,
                         progress: bool = True, max_skipped_fraction: float = MAX_SKIPPED_FRACTION) -> dict:
    """COCO (``image_root`` holds ``train2014/``, ``val2014/``) with Karpathy's splits; image ids
    are COCO ids (``cocoid``), as in BLIP's ``coco_karpathy_*_gt.json``."""
    return import_karpathy(karpathy_json, image_root, out_dir, COCO_SPLITS, "cocoid", shard_size, max_side, progress, "coco",
                           max_skipped_fraction)


def import_flickr_karpathy(karpathy_json: str, image_root: str, out_dir: str, as_zeroshot: bool = False, shard_size: int = 1000,
                           max_side: int | None = None, progress: bool = True,
                           max_skipped_fraction: float = MAX_SKIPPED_FRACTION) -> dict:
    """Flickr30k (``image_root`` holds ``1000092795.jpg`` ...); image id = the file name's number.
    ``as_zeroshot``: write only the 1K test split, as ``zeroshot/`` (zero-shot retrieval)."""
    split_map = {"test": "zeroshot"} if as_zeroshot else FLICKR_SPLITS
    return import_karpathy(karpathy_json, image_root, out_dir, split_map, None, shard_size, max_side, progress, "flickr30k",
                           max_skipped_fraction)


def inspect_shards(shards) -> dict:
    """Shards and sample counts of a shard set (e.g. an img2dataset output folder), from its
    ``_stats.json``/``sizes.json`` or by reading the tars. Nothing is converted or written."""
    urls = resolve_shards(shards)
    counts = count_shards(urls)
    return {"shards": len(urls), "samples": sum(c.samples for c in counts.values()),
            "pairs": sum(c.pairs for c in counts.values()), "urls": urls}
