"""A model-free shard worker for the shard-pattern tests, in its own light module so spawned
worker processes import little (pyarrow, torch; no model, no test fixtures)."""

from __future__ import annotations

import os

import pyarrow as pa

from blip.capfilt.reader import SampleStream
from blip.capfilt.records import ShardResult


class ByteCounter:
    """Per sample: key, loader verdict, image bytes. ``fail_on``: shard file name that raises."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on

    def __call__(self, task):
        if os.path.basename(task.url) == self.fail_on:
            raise RuntimeError("injected crash")
        stream = SampleStream(task.url)
        rows = [(v.key, v.status, len(v.raw.fields.get("jpg", b""))) for v in stream]
        table = pa.table({"key": [r[0] for r in rows], "status": [r[1] for r in rows], "nbytes": [r[2] for r in rows]})
        return ShardResult(table, shard_error=stream.shard_error)
