"""Helpers that write data files in their real formats for tests: tiny JPEGs, hand-made tars."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from PIL import Image


def tree_bytes(folder) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` (to compare two outputs byte for byte)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def image_bytes(size=(16, 16), mode="RGB", fmt="JPEG", colour=None) -> bytes:
    """Encoded image of the given PIL mode; ``fmt`` JPEG or PNG."""
    if colour is None:
        colour = {"RGB": (200, 30, 30), "L": 120, "CMYK": (0, 200, 200, 0), "RGBA": (10, 200, 10, 128),
                  "P": 3, "LA": (100, 128), "I;16": 30000}[mode]
    img = Image.new(mode, size, colour)
    buf = io.BytesIO()
    kwargs = {"transparency": 0} if (mode == "P" and fmt == "PNG") else {}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_raw_tar(path, members: list[tuple[str, bytes]]) -> bytes:
    """Write a tar with the given (name, bytes) members, as any tar tool would; returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    with open(path, "wb") as f:
        f.write(raw)
    return raw


def sample(key: str, jpg: bytes | None = None, txt: bytes | str | None = "a red square", meta: dict | None = None) -> list[tuple[str, bytes]]:
    """Members of one img2dataset sample; pass None to leave a file out."""
    out = []
    if jpg is not None:
        out.append((f"{key}.jpg", jpg))
    if txt is not None:
        out.append((f"{key}.txt", txt.encode("utf-8") if isinstance(txt, str) else txt))
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    return out


SMALL_WORLD = dict(seed=3, web=120, human=24, val=12, test=12, zeroshot=12, shard_size=20)


@pytest.fixture(scope="session", name="small_world")
def small_world_fixture(tmp_path_factory):
    """Fixture ``small_world``: root folder of a small generated dataset (all splits, 1 process);
    treat as read-only. Import it into a test module (``from fixtures_data import
    small_world_fixture``) to use it.
    """
    from blip.data.generator import GenerateConfig, generate

    root = tmp_path_factory.mktemp("world") / "generated"
    generate(GenerateConfig(**SMALL_WORLD), str(root), processes=1, progress=False)
    return root
