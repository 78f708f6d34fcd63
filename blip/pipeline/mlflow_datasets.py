"""Datasets as MLflow 3 dataset inputs, so the runs table's **Dataset** column shows what each run
read and wrote.

A dataset becomes a *dataset input* of a run (``MlflowClient.log_inputs``), listed by name and
digest with its ``mlflow.data.context`` tag (``training``, ``input``, ``evaluation``, ``output``;
MLflow has no dataset outputs, so a dataset a stage wrote is an input edge tagged ``output``). The
digest is the md5 DVC computes for the folder — the version ``dvc.lock`` records, whichever stage
logs it (data too large to hash: what DVC recorded, else a size + mtime fingerprint). Everything takes ``client`` and ``run_id`` (never the
fluent API's global run). Imports neither mlflow nor torch at module import.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

CONTEXTS = ("training", "input", "evaluation", "output")
CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
LOCK_FILE = "dvc.lock"
HASH_BUDGET = 2 << 30  # data up to this many bytes is hashed (as DVC does); beyond, DVC's record or size+mtime


# -- datasets -----------------------------------------------------------------------------------------


def find_lock(path: str | os.PathLike) -> Path | None:
    """The ``dvc.lock`` of the nearest folder at or above ``path``, or None."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if (folder / LOCK_FILE).is_file():
            return folder / LOCK_FILE
    return None


def lock_md5(path: str | os.PathLike, lock_path: str | os.PathLike | None = None) -> str | None:
    """The md5 ``dvc.lock`` records for ``path`` (``<md5>.dir`` for a folder), or None.

    Outs win over deps (an out is the version DVC stored; a dep is what a stage last read). Lock
    paths are relative to the lock's folder. ``lock_path`` None: :func:`find_lock`.
    """
    import yaml

    lock = Path(lock_path) if lock_path is not None else find_lock(path)
    if lock is None or not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{lock} is not valid YAML ({e}); restore it with `git checkout {lock.name}`") from e
    target = Path(path).resolve()
    root = lock.resolve().parent
    for kind in ("outs", "deps"):
        for stage in stages.values():
            for entry in (stage or {}).get(kind) or []:
                if (isinstance(entry, dict) and entry.get("md5") and entry.get("path")
                        and (root / entry["path"]).resolve() == target):
                    return str(entry["md5"])
    return None


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(path: str | os.PathLike) -> str:
    """The md5 DVC 3 records for ``path`` in ``dvc.lock``: a file's content md5, or for a folder
    ``md5(json of [{"md5", "relpath"}] sorted by relpath) + ".dir"`` (``dvc_data``'s ``Tree``)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot hash {root}: no such file or folder")
    if root.is_file():
        return _file_md5(root)
    entries = sorted(({"md5": _file_md5(f), "relpath": f.relative_to(root).as_posix()}
                      for f in root.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap stand-in digest for data too large to hash: md5 over the sorted ``(relative path,
    size, mtime)`` of every file under ``path``."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint {root}: no such file or folder")
    files = [root] if root.is_file() else sorted((p for p in root.rglob("*") if p.is_file()),
                                                 key=lambda p: p.relative_to(root).as_posix())
    h = hashlib.md5()
    for f in files:
        st = f.stat()
        h.update(f"{f.name if f == root else f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _digest(path, lock_path=None) -> tuple[str, str]:
    """``(digest, where it came from)``. Data up to ``HASH_BUDGET`` bytes is hashed the way DVC
    hashes it, so the digest is the version ``dvc.lock`` records whichever stage logs it (the
    stage that writes a dataset runs before DVC records it); larger data takes the md5 that
    ``dvc.lock`` or a ``<path>.dvc`` file records, else a size + mtime fingerprint."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot hash {root}: no such file or folder")
    if _size(root) <= HASH_BUDGET:
        return dvc_md5(root), "md5"
    md5 = lock_md5(root, lock_path) or _dvc_file_md5(root)
    return (md5, "dvc") if md5 else (fingerprint(root), "fingerprint")


def _dvc_file_md5(path: Path) -> str | None:
    """The md5 a ``dvc add``-ed folder's ``<path>.dvc`` records, if there is one."""
    import yaml

    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or []
    return next((str(o["md5"]) for o in outs if isinstance(o, dict) and o.get("md5")), None)


def dataset_digest(path: str | os.PathLike, lock_path: str | os.PathLike | None = None) -> str:
    """The version of the data at ``path``: DVC's md5 of it (see :func:`_digest` for large data)."""
    return _digest(path, lock_path)[0]


def dataset_profile(path: str | os.PathLike) -> dict[str, int]:
    """``files`` and ``bytes`` under ``path``, ``shards`` (``*.tar`` at its top level) and, when the
    shard metadata has them (``sizes.json``, else each shard's img2dataset ``_stats.json``),
    ``samples`` (images) and ``pairs`` ((image, caption) pairs: human data has several captions
    per image)."""
    root = Path(path)
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    tars = sorted(root.glob("*.tar")) if root.is_dir() else []
    out = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "shards": len(tars)}
    if not tars:
        return out
    stats = [t.with_name(t.stem + "_stats.json") for t in tars]
    if all(s.is_file() for s in stats):
        counts = [json.loads(s.read_text(encoding="utf-8")) for s in stats]
        out["samples"] = sum(int(c.get("successes", c.get("count", 0))) for c in counts)
        out["pairs"] = sum(int(c.get("pairs", c.get("successes", c.get("count", 0)))) for c in counts)
    elif (root / "sizes.json").is_file():
        sizes = json.loads((root / "sizes.json").read_text(encoding="utf-8"))
        out["samples"] = sum(int(sizes.get(t.name, 0)) for t in tars)
    return out


def _spec_dataset(name: str, spec: str, digest: str | None) -> tuple[str, str, str, dict]:
    """``(digest, origin, source, profile)`` of a shard spec that is no single path: the tar files it
    names (``resolve_shards``), each hashed as DVC would (or by size + mtime beyond the budget)."""
    from blip.data.shards import resolve_shards

    try:
        files = [Path(u) for u in resolve_shards(spec)]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dataset {name!r}: {e}; run the stage that writes it first") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: {spec} names missing shards, e.g. {missing[0]}")
    size = sum(f.stat().st_size for f in files)
    origin = "given"
    if digest is None:
        hashed = size <= HASH_BUDGET
        entries = [{"md5": _file_md5(f) if hashed else f"{f.stat().st_size}:{f.stat().st_mtime_ns}", "relpath": str(f)}
                   for f in files]
        digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest()
        origin = "md5" if hashed else "fingerprint"
    return digest, origin, spec, {"files": len(files), "bytes": size, "shards": len(files)}


def _as_tuple(ref) -> tuple:
    """``(name, path, digest, context)`` of a tuple or of an object with those attributes
    (``blip.track.DatasetRef``)."""
    if isinstance(ref, (tuple, list)):
        if len(ref) != 4:
            raise ValueError(f"dataset {ref!r}: expected (name, path, digest, context)")
        return tuple(ref)
    return ref.name, ref.path, ref.digest, ref.context


def log_datasets(client, run_id: str, datasets: Iterable, lock_path=None) -> list[dict[str, str]]:
    """Log ``datasets`` (``(name, path, digest, context)`` tuples, or ``blip.track.DatasetRef``s) as
    the run's dataset inputs, in one ``log_inputs`` call: ``name`` as "web", "human",
    "bootstrapped"; ``path`` a local folder or file; ``context`` one of ``CONTEXTS``; a None
    ``digest`` is :func:`dataset_digest`'s (``lock_path``: which ``dvc.lock``). The
    source is the local path (MLflow source type ``local``); the profile is :func:`dataset_profile`
    plus where the digest came from. Returns ``[{name, digest, context, source}]``.

    MLflow keeps one dataset per (experiment, name, digest): logging the same data again from
    another path links the first one logged (its source and profile stay).
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs, logged = [], []
    for ref in datasets:
        name, path, digest, context = _as_tuple(ref)
        if context not in CONTEXTS:
            raise ValueError(f"dataset {name!r}: context {context!r} is not one of {CONTEXTS}")
        origin = "given"
        if not Path(path).exists():  # a shard spec: brace pattern or "::" list (blip.data.shards)
            digest, origin, source, profile = _spec_dataset(name, str(path), digest)
        else:
            path = Path(path)
            if digest is None:
                digest, origin = _digest(path, lock_path)
            source, profile = str(path.resolve()), dataset_profile(path)
        profile = {**profile, "digest_from": origin}
        ds = Dataset(name=name, digest=str(digest), source_type="local", source=json.dumps({"uri": source}),
                     profile=json.dumps(profile))
        inputs.append(DatasetInput(ds, tags=[InputTag(CONTEXT_TAG, context)]))
        logged.append({"name": name, "digest": str(digest), "context": context, "source": source})
    if inputs:
        client.log_inputs(run_id, datasets=inputs)  # a list: the SQL store refuses other sequences
    return logged


__all__ = ["CONTEXTS", "dataset_digest", "dvc_md5", "dataset_profile", "find_lock", "fingerprint", "lock_md5", "log_datasets"]
