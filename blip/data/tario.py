"""Tar shards at the byte level: a deterministic writer and a reader that reports damage.

Why not ``tarfile`` for reading: in stream mode it ends silently when a shard is cut at a header
boundary or inside a header, so samples vanish without a trace. This reader knows the difference
between a clean end (zero block) and every kind of damage, which the loader counts.

Why not ``wds.TarWriter`` for writing: it stamps the current time into every header, so shards
written from the same seed would differ byte for byte.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ..atomic import atomic_path

BLOCK = 512
_CHUNK = 1 << 20  # bytes per read: a damaged size field must not size one read (or allocation)


@dataclass
class RawSample:
    """Files of one sample as read from a shard: ``fields`` maps extension (``"jpg"``) to bytes.

    ``error`` is set (``"truncated_tar"`` or ``"corrupt_tar"``) for the incomplete sample a
    damaged shard ended in; such a sample must be counted as skipped, never used.
    """

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    url: str = ""
    error: str | None = None


@dataclass
class ShardEnd:
    """Marker yielded once after the last sample of a shard; ``error`` names the damage, if any."""

    url: str
    error: str | None = None
    detail: str = ""


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the basename, extension = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        b = f.read(min(left, _CHUNK))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    s = field_bytes.split(b"\0", 1)[0].strip(b" ")
    return int(s, 8) if s else 0


def _checksum_ok(h: bytes) -> bool:
    try:
        stored = _octal(h[148:156])
    except ValueError:
        return False
    unsigned = sum(h) - sum(h[148:156]) + 8 * 32  # checksum field counts as spaces
    if stored == unsigned:
        return True
    # some old writers summed signed chars
    signed = unsigned - 256 * sum(1 for b in h[:148] + h[156:] if b > 127)
    return stored == signed


def _pax_path(data: bytes) -> str | None:
    # Records are "<len> <key>=<value>\n", <len> counting the whole record: a value may itself
    # hold newlines, so records are cut by length, not split on "\n". Only the path matters.
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            n = int(data[pos:space]) if space > pos else 0
        except ValueError:
            n = 0
        if n <= space - pos or space <= pos:
            return None  # not a record: damaged
        k, eq, v = data[space + 1 : pos + n].partition(b"=")
        pos += n
        if eq and k == b"path":
            return v.removesuffix(b"\n").decode("utf-8", errors="replace")
    return None


def iter_tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Yield ``(name, data, None)`` for every regular file; on damage yield
    ``(name_or_empty, None, reason)`` and stop (``name`` is known when only the data was cut).

    Reasons: ``truncated_tar`` (short header or data, or end of file without the zero block that
    closes a tar), ``corrupt_tar`` (a header whose checksum does not match, or anything but zeros
    after the zero block: a zeroed header).
    """
    long_name: str | None = None
    while True:
        h = _read_exact(f, BLOCK)
        if len(h) == 0:
            yield "", None, "truncated_tar"  # no end-of-archive block: cut at a member boundary
            return
        if len(h) < BLOCK:
            yield "", None, "truncated_tar"
            return
        if h.count(0) == BLOCK:
            # A clean end is this zero block followed by nothing but zeros (the second zero block,
            # record padding). Anything else means a header was zeroed and the members after it
            # would vanish without a trace. Reading to the end also makes gzip check its CRC.
            while rest := f.read(_CHUNK):
                if rest.strip(b"\0"):
                    yield "", None, "corrupt_tar"
                    return
            return
        if not _checksum_ok(h):
            yield "", None, "corrupt_tar"
            return
        try:
            size = _octal(h[124:136])
        except ValueError:
            yield "", None, "corrupt_tar"
            return
        typeflag = h[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(f, padded)
        if len(data) < padded:
            yield _header_name(h, long_name), None, "truncated_tar"
            return
        data = data[:size]
        if typeflag in (b"x", b"L"):
            long_name = _pax_path(data) if typeflag == b"x" else data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if typeflag not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global headers: not sample files
        name = _header_name(h, long_name)
        long_name = None
        yield name, data, None


def _header_name(h: bytes, long_name: str | None) -> str:
    if long_name is not None:
        return long_name
    name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if h[257:262] == b"ustar":
        prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = prefix + "/" + name
    return name


def open_shard(url: str) -> BinaryIO:
    """Open a local path or any URL ``webdataset.gopen`` understands (``pipe:``, ``http``...).

    Gzip-compressed shards (``.tar.gz``/``.tgz``) are detected by their magic bytes.
    """
    if os.path.exists(url):
        f: BinaryIO = open(url, "rb")
    else:
        from webdataset.gopen import gopen  # remote or pipe: sources (real-scale data)

        f = gopen(url, "rb")
    head = f.peek(2)[:2] if hasattr(f, "peek") else b""
    if head == b"\x1f\x8b":
        gz = gzip.GzipFile(fileobj=f)
        gz.myfileobj = f  # closed with the GzipFile (as gzip.open does), so a pipe's exit is checked
        return gz  # type: ignore[return-value]
    return f


def iter_shard_samples(url: str, want: set[str] | None = None) -> Iterator[RawSample | ShardEnd]:
    """Group a shard's files into samples by key; yield them, then one ``ShardEnd``.

    ``want``: extensions to keep (others are read past, not stored), e.g. ``{"txt", "json"}``
    for a caption-only pass. Members sharing a key must be adjacent, as in every webdataset
    writer; a key that reappears later starts a new sample, and so does an extension that repeats
    within a sample (never silently overwritten). The incomplete sample at a damaged
    shard's end comes back with ``error`` set. Never raises for damaged or missing shards: the
    ``ShardEnd`` carries the reason (``unreadable_shard`` when the file cannot be opened).
    """
    try:
        f = open_shard(url)
    except Exception as e:  # missing file, permission, failed pipe: the loader counts it
        yield ShardEnd(url, "unreadable_shard", f"{type(e).__name__}: {e}")
        return
    current: RawSample | None = None
    exts: set[str] = set()  # extensions of ``current`` read so far (also those not in ``want``)
    error: str | None = None
    detail = ""
    try:
        for name, data, reason in iter_tar_members(f):
            key, ext = split_name(name)
            # A new sample starts where the key changes, or where an extension repeats (the same
            # sample written twice in a row): never overwrite a file already read.
            new = current is None or key != current.key or ext in exts
            if reason is not None:
                error = reason
                if name and new:
                    # The cut member starts a new sample: the previous one is complete.
                    if current is not None:
                        yield current
                    current = RawSample(key=key, url=url)
                break
            assert data is not None
            if new:
                if current is not None:
                    yield current
                current, exts = RawSample(key=key, url=url), set()
            exts.add(ext)
            if want is None or ext in want:
                current.fields[ext] = data
    except GeneratorExit:  # closed early (or at interpreter exit, when ``zlib``/``gzip`` may already be gone)
        raise
    except (zlib.error, gzip.BadGzipFile) as e:  # damaged compressed data, gzip CRC mismatch
        error, detail = "corrupt_tar", f"{type(e).__name__}: {e}"
    except (OSError, EOFError) as e:  # cut gzip stream, pipe failures
        error, detail = "truncated_tar", f"{type(e).__name__}: {e}"
    finally:
        try:
            f.close()
        except (OSError, EOFError) as e:  # a failed pipe: source reports its exit status here
            if error is None:
                error, detail = "truncated_tar", f"{type(e).__name__}: {e}"
    if current is not None:
        if error is not None:
            # Everything before this sample was complete; this one may be missing files (when the
            # damage hit a header we cannot tell, so the last sample read is not trusted).
            current.error = error
            current.fields = {}
        yield current
    yield ShardEnd(url, error, detail)


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """Write ``members`` (name, bytes) as a tar whose bytes depend only on the members.

    mtime 0, uid/gid 0, empty user/group names, mode 0644, POSIX ustar/pax headers. Written to a
    temporary name and renamed, so a reader never sees half a shard.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            ti.mode = 0o644
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            tf.addfile(ti, io.BytesIO(data))
