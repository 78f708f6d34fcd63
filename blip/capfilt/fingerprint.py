"""Fingerprints that decide whether a stored CapFilt result is still valid: of input shards
(cheap: size + head + tail), of small files and model checkpoints (whole content), of configs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def file_fingerprint(path: str | os.PathLike, edge: int = 1 << 20) -> str:
    """Cheap content fingerprint of a (large) input file: size + BLAKE2 of its first and last
    ``edge`` bytes (the whole file when it is at most ``2 * edge``).

    Survives copies and ``dvc checkout`` (no mtimes); catches a regenerated or replaced shard. A
    same-size change confined to the middle of a shard larger than 2 MiB goes unnoticed: delete
    the stage's output folder (DVC does when it reruns a stage) after editing shards in place.
    A URL (``pipe:``, ``s3://``...) is fingerprinted by :func:`url_fingerprint`.
    """
    from ..data.shards import is_local

    if not is_local(str(path)):
        return url_fingerprint(str(path))
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= 2 * edge:
            h.update(f.read())
        else:
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read(edge))
    return f"{size}:{h.hexdigest()}"


def url_fingerprint(url: str) -> str:
    """A remote shard's fingerprint without downloading it: the URL, plus for ``scheme://`` URLs
    what the store reports (size, ETag, mtime) through fsspec. A ``pipe:`` URL is its command: a
    changed object behind the same command goes unnoticed, so give each version its own URL."""
    parts = [f"url:{url}"]
    if not url.startswith("pipe:"):
        try:
            import fsspec

            fs, p = fsspec.core.url_to_fs(url)
            info = fs.info(p)
            parts += [f"{k}={info[k]}" for k in ("size", "ETag", "etag", "md5", "mtime", "LastModified", "last_modified")
                      if info.get(k) is not None]
        except (OSError, ValueError, ImportError):  # unreachable here: the reader will name it
            pass
    return "|".join(parts)


def content_hash(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """BLAKE2 of whole files (names relative to ``root`` included): model checkpoints, small tables."""
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(str(p) for p in paths):
        h.update((os.path.relpath(p, root) if root else os.path.basename(p)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def dir_fingerprint(directory: str | os.PathLike) -> str:
    """:func:`content_hash` of every file under ``directory`` (a model checkpoint folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder")
    return content_hash([p for p in directory.rglob("*") if p.is_file()], root=directory)


def config_hash(stage: str, version: int, fields: dict[str, Any]) -> str:
    """Hash of what decides a stage's results. Leave out how it runs (batch size, device,
    workers): a rerun on another machine must not redo finished shards."""
    blob = json.dumps({"stage": stage, "version": version, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
