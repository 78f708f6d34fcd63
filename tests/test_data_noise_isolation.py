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


# Every caller of the one reader, by module and function: the evaluation instruments that measure
# against the truth, and the oracle ceiling of assemble. A new caller fails here until a reviewer
# has looked at it and added it.
KNOWN_CALLERS = {
    ("blip/evaluate/filter_quality.py", "evaluate_filter"),  # the filter's precision/recall/AUC
    ("blip/evaluate/gallery.py", "capfilt_gallery"),  # the report's picture of kept/dropped texts
    ("blip/data/contact_sheet.py", "contact_sheet"),  # red frames on the noisy pairs
    ("blip/capfilt/assemble.py", "_oracle_labels"),  # capfilt.filter_score: oracle (the ceiling cell) only
    ("blip/evaluate/calibration_sample.py", "labelled_sample"),  # stands in for a person labelling (calibrate sample)
    ("bench/probe_recipe.py", "val_metrics"),  # a bench script: the filter per noise kind
}
SCANNED = ("blip", "bench", "flows", "byod", "scripts")  # everything but the tests


# The same for the other hidden truth, each web image's scene: the caption checker regenerates it
# (``caption_check.scene_of_web``) to check synthetic captions, and only the filter_quality stage
# asks for that check. Both calls are listed; a new caller of either fails here.
KNOWN_SCENE_CALLERS = {
    ("blip/evaluate/caption_check.py", "check_synthetic"),  # scene_of_web: the synthetic captions' truth
    ("blip/stages/capfilt.py", "_synthetic_check"),  # check_synthetic: the filter_quality stage's synthetic_check
    ("bench/itm_negatives_table.py", "row"),  # check_synthetic: a bench script's table (--check)
    ("bench/probe_captioner.py", "check_split"),  # scene_of_web: a bench script checks val captions (recipe choice)
    ("bench/probe_filter.py", "main"),  # check_synthetic: a bench script measures a filter recipe (docs/recipe.md §0.11)
    ("bench/probe_caption_ceiling.py", "main"),  # scene_of_web: a bench script, the captioner vs its ViT on val (§0.12)
}
SCENE_READERS = ("scene_of_web", "check_synthetic")


def _callers(root: pathlib.Path, names=("noise_labels",),
             definer: str | None = "blip/data/labels.py") -> tuple[set[tuple[str, str]], set[str]]:
    """(module, enclosing function) of every call of a function in ``names``, and the modules
    importing one (``definer``, where they are defined, left out)."""
    import ast

    calls, imports = set(), set()
    for folder in SCANNED:
        for path in (root / folder).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if rel == definer:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and any(a.name in names for a in node.names):
                    imports.add(rel)
                for child in ast.iter_child_nodes(node):
                    child.parent = node  # type: ignore[attr-defined]
            for node in ast.walk(tree):
                name = getattr(node, "func", None)
                if isinstance(node, ast.Call) and getattr(name, "id", getattr(name, "attr", None)) in names:
                    fn = node
                    while fn is not None and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        fn = getattr(fn, "parent", None)
                    calls.add((rel, fn.name if fn is not None else "<module>"))
    return calls, imports


def test_every_caller_of_the_noise_label_reader_is_a_known_evaluation_instrument(tmp_path):
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "train.py").write_text("from .data.labels import noise_labels\n\n"
                                                "def fit(web):\n    return labels.noise_labels(web)\n")
    assert _callers(tmp_path) == ({("blip/train.py", "fit")}, {"blip/train.py"})  # the check can fail
    root = BLIP.parent
    calls, imports = _callers(root)
    assert calls == KNOWN_CALLERS, ("a new caller of blip.data.labels.noise_labels (the hidden labels must never reach "
                                    f"training or filtering): {sorted(calls - KNOWN_CALLERS)}; gone: "
                                    f"{sorted(KNOWN_CALLERS - calls)}")
    assert imports == {m for m, _ in KNOWN_CALLERS}  # nobody imports it to hand it on
    # and assemble reads them only on the oracle path: the one call site is reached only for score: oracle
    src = (root / "blip/capfilt/assemble.py").read_text(encoding="utf-8")
    assert src.count("_oracle_labels(") == 2 and '_oracle_labels(web) if oracle else None' in src
    assert 'oracle = cfg.score == "oracle" and cfg.use_filter' in src


def test_every_reader_of_the_web_scenes_is_a_known_evaluation_instrument(tmp_path):
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "filter.py").write_text("from .evaluate.caption_check import scene_of_web\n\n"
                                                 "def keep(key, cfg):\n    return scene_of_web(key, cfg)\n")
    assert _callers(tmp_path, SCENE_READERS, definer=None) == ({("blip/filter.py", "keep")}, {"blip/filter.py"})
    calls, imports = _callers(BLIP.parent, SCENE_READERS, definer=None)
    new, gone = sorted(calls - KNOWN_SCENE_CALLERS), sorted(KNOWN_SCENE_CALLERS - calls)
    assert calls == KNOWN_SCENE_CALLERS, ("a new caller of the web scenes (caption_check.scene_of_web or check_synthetic: "
                                          f"hidden truth, never for training or filtering): {new}; gone: {gone}")
    assert imports <= {m for m, _ in KNOWN_SCENE_CALLERS}  # nobody imports them to hand them on
