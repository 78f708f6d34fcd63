"""Shard sets in the img2dataset convention: naming, writing, finding and counting.

A shard set is a folder of ``{shard:05d}.tar`` files, each holding samples ``<key>.jpg``,
``<key>.txt`` (caption) and ``<key>.json`` (metadata), with ``key = f"{shard:05d}{index:04d}"``
(9 digits, as img2dataset names them with its default 10 000 samples per shard), and beside each
tar ``{shard:05d}_stats.json``. We also write open_clip's ``sizes.json`` (tar name -> samples).

Sample counts are what the loader needs to fix the epoch length; ``count_shards`` finds them in
``sizes.json``, else in img2dataset's ``_stats.json`` (``successes``), else by reading the tar.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from ..atomic import write_bytes_atomic
from .tario import RawSample, iter_shard_samples, write_tar

MAX_SHARD_SIZE = 10_000  # 4 index digits in a 9-digit key


def make_key(shard: int, index: int) -> str:
    """img2dataset's key: 5-digit shard id + 4-digit index within the shard."""
    if not 0 <= index < MAX_SHARD_SIZE:
        raise ValueError(f"index {index} does not fit the 4-digit in-shard part of a key (shard_size <= {MAX_SHARD_SIZE})")
    return f"{shard:05d}{index:04d}"


def dumps(obj) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces variance) so equal content = equal bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def sample_members(key: str, jpg: bytes, caption: str, meta: dict) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in the order img2dataset writes them."""
    return [(f"{key}.jpg", jpg), (f"{key}.txt", caption.encode("utf-8")), (f"{key}.json", dumps(meta))]


def write_shard(out_dir: str, shard: int, members: list[tuple[str, bytes]], n_samples: int, n_pairs: int, extra_stats: dict | None = None) -> str:
    """Write ``{shard:05d}.tar`` and ``{shard:05d}_stats.json`` into ``out_dir``; returns the tar path.

    The stats keep img2dataset's field names (``count``, ``successes``, ``status_dict`` ...) minus
    the timings, which would make re-generated folders differ; ``pairs`` is ours (human data has
    several captions per image and the loader's epoch length counts pairs).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{shard:05d}.tar")
    write_tar(path, members)
    stats = {
        "count": n_samples,
        "successes": n_samples,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "status_dict": {"success": n_samples},
        "pairs": n_pairs,
        **(extra_stats or {}),
    }
    write_bytes_atomic(os.path.join(out_dir, f"{shard:05d}_stats.json"), dumps(stats))
    return path


def write_sizes(out_dir: str, sizes: dict[str, int]) -> None:
    """open_clip's ``sizes.json``: tar file name -> number of samples."""
    os.makedirs(out_dir, exist_ok=True)
    write_bytes_atomic(os.path.join(out_dir, "sizes.json"), dumps(dict(sorted(sizes.items()))))


SHARD_EXTENSIONS = (".tar.gz", ".tgz", ".tar")


def is_local(url: str) -> bool:
    """A path on this host, as opposed to a webdataset URL (``pipe:...``, ``s3://``, ``https://``)."""
    url = str(url)
    return not (url.startswith("pipe:") or "://" in url)


def shard_file_name(url: str) -> str:
    """The shard's file name, also inside a URL: ``/d/00003.tar``, ``s3://b/d/00003.tar?v=2`` and
    ``pipe:aws s3 cp s3://b/d/00003.tar -`` all give ``00003.tar``."""
    url = str(url)
    if url.startswith("pipe:"):
        for token in reversed(url[5:].split()):
            if token.rstrip("/").endswith(SHARD_EXTENSIONS):
                return os.path.basename(token.rstrip("/"))
        raise ValueError(f"{url!r}: a pipe: shard URL must name its .tar file (e.g. 'pipe:curl -s https://.../00003.tar')"
                         "; the shard's file name identifies its results")
    if "://" in url:
        url = url.split("?", 1)[0].split("#", 1)[0]
    return os.path.basename(url.rstrip("/"))


def resolve_shards(spec) -> list[str]:
    """Shard URLs from a folder, a tar path, a brace pattern (``a/{00000..00003}.tar``), a
    ``::``-separated string of those, or a list of any of them. Order is preserved; a folder
    contributes its ``*.tar`` files sorted by name.

    Raises ``FileNotFoundError`` naming the spec when a folder holds no tar, so an empty dataset
    never silently trains on nothing.
    """
    from braceexpand import (
        braceexpand,  # what webdataset expands with (without importing it: torch)
    )

    if isinstance(spec, (str, os.PathLike)):
        parts = str(spec).split("::")
    else:
        parts = [str(s) for s in spec]
    urls: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in folder {part!r}; generate or import data into it first")
            urls += found
        else:
            expanded = list(braceexpand(part))
            missing = [u for u in expanded if is_local(u) and not os.path.isfile(u)]
            if missing:
                raise FileNotFoundError(
                    f"shard path {missing[0]!r} does not exist" + (f" ({len(missing)} of {len(expanded)} in {part!r} are "
                                                                    "missing)" if len(expanded) > 1 else "")
                    + "; check the path (a typo? run from the project root?) — nothing is read from a partial list")
            urls += expanded
    if not urls:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return urls


def _remote_json(url: str) -> dict | None:
    """img2dataset's ``_stats.json`` beside a remote shard (``s3://``, ``https://``: fsspec), or None."""
    if url.startswith("pipe:"):
        return None
    try:
        import fsspec

        with fsspec.open(url, "rb") as f:
            return json.load(f)
    except (OSError, ValueError, ImportError):  # absent, unreachable, or no fsspec backend for the scheme
        return None


@dataclass
class ShardCount:
    samples: int  # images / tar samples
    pairs: int  # (image, caption) pairs: equal to samples unless several captions per image


def _stats_count(url: str) -> ShardCount | None:
    base = url[: -len(".tar")] if url.endswith(".tar") else None
    if base is None:
        return None
    if is_local(url):
        if not os.path.exists(base + "_stats.json"):
            return None
        with open(base + "_stats.json", encoding="utf-8") as f:
            st = json.load(f)
    else:
        st = _remote_json(base + "_stats.json")
        if st is None:
            return None
    if "successes" not in st:
        return None
    return ShardCount(int(st["successes"]), int(st.get("pairs", st["successes"])))


def count_shards(urls: list[str], captions_key: str = "captions") -> dict[str, ShardCount]:
    """Samples and pairs per shard, from metadata when present, else by reading each tar.

    Reading a tar counts samples with an image and, for pairs, the entries of ``json[captions]``
    (human data) or 1.
    """
    out: dict[str, ShardCount] = {}
    sizes_cache: dict[str, dict] = {}
    for url in urls:
        c = _stats_count(url)
        if c is None and is_local(url):
            folder = os.path.dirname(url)
            if folder not in sizes_cache:
                p = os.path.join(folder, "sizes.json")
                sizes_cache[folder] = json.load(open(p, encoding="utf-8")) if os.path.exists(p) else {}
            n = sizes_cache[folder].get(os.path.basename(url))
            if n is not None:
                c = ShardCount(int(n), int(n))
        if c is None:
            c = ShardCount(0, 0)
            for s in iter_shard_samples(url, want={"json"}):
                if isinstance(s, RawSample) and s.error is None:
                    c.samples += 1
                    try:
                        caps = json.loads(s.fields.get("json", b"{}")).get(captions_key)
                    except (ValueError, AttributeError, RecursionError):  # junk, or nested past the parser's depth
                        caps = None
                    c.pairs += len(caps) if isinstance(caps, list) and caps else 1
        out[url] = c
    return out
