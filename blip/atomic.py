"""Atomic writes, written once: a file or a folder appears whole or not at all.

Everything is staged beside its target (same folder, so the final rename is atomic) under one
temporary-name scheme, ``<target>.tmp-<pid>-<thread>``; a folder being replaced is renamed aside
to ``<target>.old-<pid>-<thread>`` for the moment between its two renames. The names say who made
them, so :func:`remove_stale_tmp` can tell a leftover of a killed run (its process gone) from the
work of a run that is still going.

* :func:`atomic_path` — a file: yield the temporary name, rename it over the target on success,
  remove it on any failure (Ctrl-C included);
* :func:`write_bytes_atomic` — the same for bytes in hand;
* :func:`atomic_dir` — a folder: yield a fresh temporary folder, swap it in whole on success (the
  previous folder, if any, is removed), remove it on failure (the previous folder stays as it was);
* :func:`remove_stale_tmp` — clear what a killed run left beside a target.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TAG = re.compile(r"\.(tmp|old)-(\d+)(?:-(\d+))?$")


def _suffix(kind: str) -> str:
    return f".{kind}-{os.getpid()}-{threading.get_ident()}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (``<path>.tmp-<pid>-<thread>``); rename it over
    ``path`` when the block succeeds, remove it when anything fails (an interrupt included)."""
    tmp = f"{os.fspath(path)}{_suffix('tmp')}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextmanager
def atomic_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh folder beside ``directory`` to write into; on success it takes ``directory``'s
    place in one step and the previous folder, if any, is deleted.

    A symlinked ``directory`` stays a link: the folder it points to is the one replaced. On an
    exception (Ctrl-C included) the new folder is deleted and ``directory`` is as it was. What a
    killed run left beside it is cleared first (:func:`remove_stale_tmp`); a run killed between its
    two renames left only ``<directory>.old-*``, which is put back.
    """
    out = os.path.realpath(directory)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{directory} exists and is not a folder; choose another output folder")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_tmp(out)
    tmp, old = out + _suffix("tmp"), out + _suffix("old")
    try:
        os.makedirs(tmp)
        yield Path(tmp)
        if os.path.isdir(out):
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)  # one left behind is cleared by the next run
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(path: str | os.PathLike) -> None:
    """Remove the ``<path>.tmp-*`` files or folders whose writer is gone (a killed run), and deal
    with a ``<path>.old-*`` folder of one: put back as ``path`` when ``path`` is missing (the run
    died between :func:`atomic_dir`'s two renames), else removed. Only ``path``'s own leftovers
    are touched, and none of a writer that still runs, so concurrent work beside it (other shards
    of the same folder, another process) is not disturbed."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    try:
        entries = sorted(os.listdir(folder or "."))
    except FileNotFoundError:
        return
    for entry in entries:
        m = _TAG.fullmatch(entry[len(name):]) if entry.startswith(name) else None
        if m is None or _alive(int(m.group(2)), m.group(3)):
            continue
        stale = os.path.join(folder, entry)
        if m.group(1) == "old" and not os.path.lexists(path):
            os.replace(stale, path)
        elif os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass


def _alive(pid: int, thread: str | None) -> bool:
    """Whether the writer that named a temporary still runs: another process with this id on this
    host, or another live thread of this process. Our own id with no live thread of that ident (or
    none recorded) is a leftover of a dead process that had it, as happens in containers."""
    if pid == os.getpid():
        me = threading.get_ident()
        return thread is not None and int(thread) != me and int(thread) in {t.ident for t in threading.enumerate()}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
