"""Noise labels are for evaluation only: training and filtering data paths never expose them."""

import pathlib
import re

import torch

from blip.data.generator import GenerateConfig, generate
from blip.data.labels import noise_labels
from blip.data.loader import make_loader
from blip.data.noise import NOISE_KINDS

BLIP = pathlib.Path(__file__).resolve().parents[1] / "blip"
# the writer (generator.py) and the one reader (labels.py) are the only places allowed to touch it
ALLOWED = {BLIP / "data" / "generator.py", BLIP / "data" / "labels.py"}
READS_NOISE = re.compile(r"""\[\s*['"]noise['"]\s*\]|get\(\s*['"]noise['"]|NOISE_FIELD|['"]noise['"]\s*in\b""")


def _strings(batch):
    for k, v in batch.items():
        yield k
        if isinstance(v, list):
            for x in v:
                yield from (x if isinstance(x, list) else [x])


def test_batches_never_carry_noise_labels(tmp_path):
    root = tmp_path / "all_noisy"
    generate(GenerateConfig(seed=9, web=40, human=0, val=0, test=0, zeroshot=0, shard_size=10, noise_rate=1.0),
             str(root), splits=("web",), processes=1, progress=False)
    labels = noise_labels(root / "web")
    assert len(labels) == 40 and all(v in NOISE_KINDS for v in labels.values())  # the labels exist on disk
    kinds = set(NOISE_KINDS) | {"noise"}
    for train in (True, False):  # training path and the captioning/filtering (eval) path
        for num_workers in (0, 2):
            loader = make_loader(root / "web", batch_size=8, train=train, num_workers=num_workers, num_samples=40)
            n = 0
            for batch in loader:
                assert set(batch) == {"image", "text", "captions", "key", "image_id", "shard"}
                assert not kinds & set(_strings(batch))
                assert all(isinstance(v, (torch.Tensor, list)) for v in batch.values())
                n += len(batch["key"])
            assert n == (len(loader) * 8 if train else 40)


def test_only_the_writer_and_labels_module_touch_the_noise_field():
    offenders = []
    for path in BLIP.rglob("*.py"):
        if path in ALLOWED:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if READS_NOISE.search(line):
                offenders.append(f"{path.relative_to(BLIP.parent)}:{i}: {line.strip()}")
    assert offenders == [], "read noise labels only through blip.data.labels.noise_labels:\n" + "\n".join(offenders)
    assert READS_NOISE.search('meta.get("noise")') and READS_NOISE.search("x['noise']")  # the check can fail
