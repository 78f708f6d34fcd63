"""The shard worker pattern, written once: per input shard, skip a valid result or compute one
and commit it atomically. The caption, filter and assemble stages are three uses of it.

A *result* is a parquet table per input shard with its *record* in the footer; what it holds,
when it is valid (and its shard skipped) and how it is committed atomically: ``records.py``.
Temporaries left by a killed process are removed when a later run commits that shard; a failed
shard removes its own.

Fan-out: ``workers <= 1`` runs shards in order in this thread; otherwise a
``concurrent.futures`` pool: ``executor="thread"`` (default: the model is loaded once and shared,
torch releases the GIL in its kernels, and decoding one shard overlaps compute on another) or
``"process"`` (spawned processes, each loading its own model: for CPU-bound decoding or one
process per device) or ``"ray"`` (Ray actors on one host or a cluster, each loading its own model
on its own GPU; results come back to this process, which commits them: ``ray_executor.py``).
On the first failure, shards not yet started are cancelled, running ones
finish and commit, and the error is raised naming the shard.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import (
    FIRST_EXCEPTION,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)

from ..data.progress import progress_bar
from ..data.shards import SHARD_EXTENSIONS, shard_file_name
from .config import check_fan_out
from .records import ShardResult, ShardTask, commit, is_valid, shard_failed

_log = logging.getLogger("blip.capfilt")

Worker = Callable[[ShardTask], ShardResult]


def _do(task: ShardTask, work: Worker, out_dir: str, stage: str, cfg_hash: str) -> dict:
    t = time.perf_counter()
    result = work(task)
    rec = commit(task, result, out_dir, stage, cfg_hash)
    _log.info("%s: %s -> %s (%d rows, %.1f s)", stage, task.url, task.name, rec["rows"], time.perf_counter() - t)
    return rec


_PROCESS_WORKER: Worker | None = None  # one per spawned worker process (set by its initializer)


def _process_init(factory: Callable[[], Worker], threads: int) -> None:
    global _PROCESS_WORKER
    import torch

    torch.set_num_threads(threads)
    _PROCESS_WORKER = factory()


def _process_do(task: ShardTask, out_dir: str, stage: str, cfg_hash: str) -> dict:
    assert _PROCESS_WORKER is not None
    return _do(task, _PROCESS_WORKER, out_dir, stage, cfg_hash)


def check_unique_names(tasks: list[ShardTask]) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise ValueError(f"shards {seen[t.name]} and {t.url} would both write {t.name}: pass one shard set "
                             "per output folder (shard file names must be unique)")
        seen[t.name] = t.url


def run_shards(
    stage: str,
    tasks: list[ShardTask],
    out_dir: str | os.PathLike,
    worker_factory: Callable[[], Worker],
    cfg_hash: str,
    workers: int = 1,
    executor: str = "thread",
    tracker=None,
    progress: bool = False,
    ray=None,
    prepare: Callable[[ShardTask], ShardTask] | None = None,
) -> dict:
    """Bring every task's result in ``out_dir`` up to date; returns the summary::

        stage, out_dir, shards, done, skipped_existing, rows (all shards), rows_done (this run),
        status {status: rows} (all shards), shard_errors {result name: error}, seconds

    ``worker_factory()`` builds the per-shard function (loading models) once per thread pool or
    once per process; it must be picklable for ``executor="process"`` (a ``functools.partial``
    of a module-level class). It is not called when every shard is already valid.
    ``ray``: ``RayOptions`` for ``executor="ray"``. ``prepare(task)`` (Ray only): called here, in
    this process, just before a task is shipped to its worker, to attach what a worker on another
    host could not read from this host's disk (the filter's caption table).
    """
    check_fan_out(workers, executor)
    t0 = time.perf_counter()
    out = str(out_dir)
    os.makedirs(out, exist_ok=True)
    check_unique_names(tasks)
    records: dict[str, dict] = {}
    todo: list[ShardTask] = []
    for task in tasks:
        rec = is_valid(os.path.join(out, task.name), task, stage, cfg_hash)
        if rec is not None:
            records[task.name] = rec
        else:
            todo.append(task)
    if todo:
        _log.info("%s: %d of %d shards to compute into %s (%d already done)", stage, len(todo), len(tasks), out,
                  len(tasks) - len(todo))
    bar = progress_bar(len(todo), progress and bool(todo), stage, unit="shard")
    done_records: list[dict] = []

    def finished(rec: dict) -> None:
        done_records.append(rec)
        bar.update(1)
        if tracker is not None:
            tracker.log_metrics({f"{stage}/shards_done": len(done_records),
                                 f"{stage}/rows_done": sum(r["rows"] for r in done_records)}, step=len(done_records))

    try:
        if todo and executor == "ray":
            from .ray_executor import run_ray

            run_ray(stage, todo, out, worker_factory, cfg_hash, workers, ray, records, finished, prepare)
        elif todo and workers <= 1:
            work = worker_factory()
            for task in todo:
                try:
                    rec = _do(task, work, out, stage, cfg_hash)
                except Exception as e:
                    raise shard_failed(stage, task, e) from e
                records[task.name] = rec
                finished(rec)
        elif todo:
            _run_pool(stage, todo, out, worker_factory, cfg_hash, workers, executor, records, finished)
    finally:
        bar.close()

    status: Counter = Counter()
    for rec in records.values():
        status.update(rec.get("status") or {})
    summary = {
        "stage": stage,
        "out_dir": out,
        "shards": len(tasks),
        "done": len(done_records),
        "skipped_existing": len(tasks) - len(done_records),
        "rows": sum(r["rows"] for r in records.values()),
        "rows_done": sum(r["rows"] for r in done_records),
        "status": dict(sorted(status.items())),
        "shard_errors": {name: r["shard_error"] for name, r in sorted(records.items()) if r.get("shard_error")},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if tracker is not None:
        tracker.log_metrics({f"{stage}/{k}": summary[k] for k in ("shards", "done", "skipped_existing", "rows")})
    return summary


def _run_pool(stage, todo, out, worker_factory, cfg_hash, workers, executor, records, finished) -> None:
    if executor == "thread":
        work = worker_factory()  # one model shared by all threads
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"capfilt-{stage}")
        submit = lambda task: pool.submit(_do, task, work, out, stage, cfg_hash)
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_process_init, initargs=(worker_factory, threads))
        submit = lambda task: pool.submit(_process_do, task, out, stage, cfg_hash)
    futures: dict[Future, ShardTask] = {}
    error: tuple[ShardTask, BaseException] | None = None
    with pool:
        futures = {submit(task): task for task in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                task = futures[fut]
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is not None:
                    if error is None:
                        error = (task, exc)
                        for p in pending:
                            p.cancel()  # not started: left for the rerun; running ones finish and commit
                    continue
                rec = fut.result()
                records[task.name] = rec
                finished(rec)
    if error is not None:
        task, exc = error
        raise shard_failed(stage, task, exc) from exc


def shard_tasks(urls: list[str], out_name: Callable[[str], str], fingerprints: Callable[[str], dict[str, str]]) -> list[ShardTask]:
    """Tasks for ``urls`` with their expected row counts from shard metadata (``count_shards``)."""
    from ..data.shards import count_shards

    counts = count_shards(urls)
    return [ShardTask(u, out_name(u), counts[u].samples, fingerprints(u)) for u in urls]


def result_name(url: str) -> str:
    """``.../00003.tar`` -> ``00003.parquet`` (also for ``.tar.gz``/``.tgz`` and shard URLs:
    ``pipe:curl -s https://host/00003.tar``)."""
    base = shard_file_name(url)
    for ext in SHARD_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)] + ".parquet"
    return base + ".parquet"
