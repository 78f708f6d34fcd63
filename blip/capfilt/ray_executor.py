"""``executor: ray`` — the shard stages fanned out over a Ray cluster (one host or many).

Each of ``workers`` Ray actors calls ``worker_factory()`` once (loading the captioner or filter:
on the GPU Ray gives it, ``num_gpus`` per actor; on CPU when the cluster has none) and then
computes one shard at a time. The actor returns the shard's *table* to the driver; the driver
checks it and commits it atomically (``records.commit``), exactly as the thread and process
executors do, so the tables are the same bytes and workers need no shared output filesystem.

What workers must reach: the input shards (a path every host can read, or a URL: ``pipe:``,
``https://``, ``s3://`` through fsspec), the model checkpoint at the same path on every host,
and this package installed (``pip install -e .`` on every host). Caption tables for the filter
travel with the task (``prepare``), not through a filesystem.

A worker that dies mid-shard (OOM-killed, node lost, preempted) loses nothing: its shard had not
been committed, so the driver starts a fresh actor and gives the shard to it, up to
``max_retries`` times per shard. A shard whose *code* fails (a bad input, a bug) is not retried:
as in the other executors, no new shards start, running ones finish and commit, and the error is
raised naming the shard.

``address``: ``None`` follows Ray's own lookup (``$RAY_ADDRESS``, then a cluster started on this
host by ``ray start``, else a new local Ray); ``"local"`` always starts a private local Ray;
``"auto"`` or ``"host:port"`` joins that cluster. A Ray started here is shut down at the end.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .records import commit, shard_failed

_log = logging.getLogger("blip.capfilt")


@dataclass(frozen=True)
class RayOptions:
    """How the Ray executor places its actors (``compute.ray_*`` in ``params.yaml``)."""

    address: str | None = None
    num_gpus: float | str = "auto"  # per actor; auto: 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0  # per actor; also its torch threads
    max_retries: int = 3  # per shard, when its worker dies (not when its code raises)

    def __post_init__(self) -> None:
        if self.num_gpus != "auto" and not (isinstance(self.num_gpus, (int, float)) and self.num_gpus >= 0):
            raise ValueError(f"ray num_gpus={self.num_gpus!r}: a number >= 0 or 'auto'")
        if not (isinstance(self.num_cpus, (int, float)) and self.num_cpus > 0):
            raise ValueError(f"ray num_cpus={self.num_cpus!r}: a number > 0")
        if self.max_retries < 0:
            raise ValueError(f"ray max_retries={self.max_retries}: must be >= 0")


def _import_ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is in the test extra
        raise ImportError("executor: ray needs Ray: pip install 'blip-bootstrap[ray]' (or pip install ray) on "
                          "the driver and on every worker host") from e
    return ray


class _ShardActor:
    """One Ray worker: the model, loaded once, and the shards given to it one by one."""

    def __init__(self, factory: Callable, threads: int):
        import torch

        torch.set_num_threads(threads)
        try:
            self.work = factory()
        except Exception as e:
            raise RuntimeError(f"Ray worker on host {socket.gethostname()} could not build its shard worker "
                               f"({type(e).__name__}: {e}); the model checkpoint must be readable at the same path "
                               "on every host, and blip installed there") from e

    def ready(self) -> bool:
        return True

    def run(self, task):
        result = self.work(task)
        if result.outputs:
            raise RuntimeError(f"{task.url}: this stage writes side files ({len(result.outputs)}); it cannot run with "
                               "executor: ray, use thread or process")
        return result


def run_ray(stage, todo, out, worker_factory, cfg_hash, workers: int, opts: RayOptions | None, records: dict,
            finished: Callable[[dict], None], prepare: Callable | None = None) -> None:
    """Compute ``todo`` on ``workers`` Ray actors; commit each result here (see the module doc)."""
    ray = _import_ray()
    from ray.exceptions import RayActorError, RayTaskError

    opts = opts or RayOptions()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.address, include_dashboard=False, configure_logging=False)
    try:
        num_gpus = opts.num_gpus
        if num_gpus == "auto":
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        actor_cls = ray.remote(_ShardActor).options(num_cpus=opts.num_cpus, num_gpus=num_gpus, max_restarts=0)
        threads = max(1, int(opts.num_cpus))

        def start(n: int) -> list:
            """``n`` actors with their models loaded; a constructor that raises is an error, not a death."""
            actors = [actor_cls.remote(worker_factory, threads) for _ in range(n)]
            try:
                ray.get([a.ready.remote() for a in actors])
            except (RayActorError, RayTaskError) as e:
                last = str(e).strip().splitlines()[-1]  # the constructor's own error, without Ray's traceback
                raise RuntimeError(f"{stage}: a Ray worker could not start: {last}") from e
            return actors

        _log.info("%s: %d shards on %d Ray actors (num_cpus=%s, num_gpus=%s each)", stage, len(todo),
                  min(workers, len(todo)), opts.num_cpus, num_gpus)
        idle = start(min(workers, len(todo)))
        queue = deque(todo)
        deaths: dict[str, int] = {}
        running: dict = {}  # ObjectRef -> (task, actor)
        error = None
        while running or (queue and error is None):
            while idle and queue and error is None:
                task = queue.popleft()
                actor = idle.pop()
                running[actor.run.remote(prepare(task) if prepare is not None else task)] = (task, actor)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            task, actor = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as e:  # the worker process died: nothing of this shard was committed
                deaths[task.name] = deaths.get(task.name, 0) + 1
                if deaths[task.name] > opts.max_retries:
                    error = error or (task, RuntimeError(f"its Ray worker died {deaths[task.name]} times: {e}"))
                    continue
                _log.warning("%s: the Ray worker computing %s died; retrying the shard on a new worker "
                             "(attempt %d of %d)", stage, task.url, deaths[task.name] + 1, opts.max_retries + 1)
                queue.appendleft(task)
                if error is None:
                    idle.extend(start(1))
                continue
            except RayTaskError as e:  # the shard's own code raised
                error = error or (task, e.cause if isinstance(e.cause, BaseException) else e)
                idle.append(actor)
                continue
            idle.append(actor)
            rec = commit(task, result, out, stage, cfg_hash)
            records[task.name] = rec
            finished(rec)
        for actor in idle:
            ray.kill(actor)
        if error is not None:
            task, exc = error
            raise shard_failed(stage, task, exc) from exc
    finally:
        if started:
            ray.shutdown()
