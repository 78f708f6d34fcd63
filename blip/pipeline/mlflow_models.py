"""Models as MLflow 3 LoggedModels and registered versions, so the UI shows what each run trained.

Checkpoints become *LoggedModels* (``create_logged_model(source_run_id=...)`` + the run's
  ``log_outputs``): the runs table's **Models** column and the experiment's Models tab show them,
  each with a ``python_function`` flavour that captions images (captioner) or scores
  (image, text) pairs with ITM p(match) (filter). A version of ``blip-captioner`` / ``blip-filter``
  in the Model Registry points at the LoggedModel and carries the bootstrap's factors as tags.

Why not MLflow's fluent API (``mlflow.pyfunc.log_model``,
``mlflow.initialize_logged_model``, ``mlflow.register_model``): each resolves the *global* tracking
URI and active run, and the pipeline's stages log through an ``MlflowClient`` with explicit run ids
(``tracking``'s contract). So everything here takes ``client`` and ``run_id`` and never starts,
ends or changes the status of a run.

Why a ``python_function`` model, not the ``transformers`` flavour: the pyfunc reproduces the
``caption`` and ``filter`` stages exactly (the loader's decoding and eval transform, our nucleus
sampling with per-image seeds, prompt stripping, ``pre_caption``) and scores ITM pairs, which a
transformers ``image-to-text`` pipeline over the converted ``BlipForConditionalGeneration`` does
not. ``StageTracker.log_model(hf=True)`` still logs that transformers export as run artifacts.

Neither ``mlflow`` nor ``torch`` is imported at module import: this module is also the pyfunc's
``loader_module`` (``_load_pyfunc``), shipped inside the model with the ``blip`` package.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..track import flatten
from .mlflow_datasets import dataset_digest

ROLES = ("captioner", "filter")
REGISTERED_NAMES = {"captioner": "blip-captioner", "filter": "blip-filter"}
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # what the LoggedModel page reads its registered versions from
ROLE_TAG = "blip.role"
_CAPTION_KEYS = ("method", "top_p", "top_k", "num_beams", "length_rule", "max_length", "min_length", "seed", "batch_size")
_FILTER_KEYS = ("max_length", "batch_size")
# What the pyfunc imports when it loads (blip.capfilt.models and friends), pinned to this
# environment's versions; explicit, so MLflow does not infer requirements (it would load the model
# in a subprocess: slow, and offline-unsafe).
PIP_PACKAGES = ("torch", "timm", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas",
                "pyarrow", "pyyaml")


# -- models -------------------------------------------------------------------------------------------


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in PIP_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _predict_defaults(role: str, generation: dict[str, Any] | None) -> dict[str, Any]:
    """What ``predict`` uses unless ``params`` override it: the captioner decodes as the ``caption``
    stage's ``CaptionConfig`` (its defaults updated with ``generation``, validated here); the
    filter tokenises as the ``filter`` stage (``FilterConfig``)."""
    from dataclasses import asdict

    from blip.capfilt.config import CaptionConfig, FilterConfig

    if role == "filter":
        if generation:
            raise ValueError("generation= is for the captioner; the filter does not decode")
        cfg = asdict(FilterConfig())
        return {k: cfg[k] for k in _FILTER_KEYS}
    unknown = sorted(set(generation or {}) - set(_CAPTION_KEYS))
    if unknown:
        raise ValueError(f"generation keys {unknown} unknown; use some of {list(_CAPTION_KEYS)}")
    cfg = asdict(CaptionConfig(**(generation or {})))
    return {k: cfg[k] for k in _CAPTION_KEYS}


def _signature(role: str, defaults: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    def spec(name, value):
        kind = "string" if isinstance(value, str) else "double" if isinstance(value, float) else "long"
        return ParamSpec(name, kind, value)

    if role == "captioner":
        inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "key", required=False),
                         ColSpec("string", "shard", required=False)])
        outputs = Schema([ColSpec("string", "caption")])
    else:
        inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "text")])
        outputs = Schema([ColSpec("double", "p_match")])
    return ModelSignature(inputs, outputs, ParamSchema([spec(k, v) for k, v in defaults.items()]))


def _input_example(role: str):
    """One grey 16x16 JPEG (and a text for the filter): shown on the model page and saved as the
    REST serving example; MLflow only checks it against the signature (no model load)."""
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="JPEG")
    example = {"image": [buf.getvalue()]}
    if role == "filter":
        example["text"] = ["a grey square"]
    return pd.DataFrame(example)


def _same_store(a: str, b: str) -> bool:
    def norm(uri: str) -> str:
        return str(Path(uri[len("sqlite:///"):]).resolve()) if uri.startswith("sqlite:///") else uri.rstrip("/")

    return norm(a) == norm(b)


def _version_source(client, model) -> str:
    """``models:/<model_id>`` (the registry page then links the version to its LoggedModel) when the
    default client reaches this client's store; else the LoggedModel's artifact location. The SQL
    registry store resolves a ``models:/`` source through ``MlflowClient()`` — the *global* tracking
    URI — so from another store it would fail, or read the wrong database."""
    import mlflow

    if _same_store(mlflow.get_tracking_uri(), client.tracking_uri):
        return f"models:/{model.model_id}"
    return model.artifact_location


def _register(client, name: str, model, run_id: str, tags: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=f"BLIP {model.tags.get(ROLE_TAG, '')} checkpoints "
                                                          "of the CapFilt bootstrap (blip-bootstrap)")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, source=_version_source(client, model), run_id=run_id, tags=tags,
                                     model_id=model.model_id, await_creation_for=0)
    # The LoggedModel page and the runs table's Models column list a model's registry versions
    # from this tag (mlflow.register_model sets it; the SQL store keeps no model_id on versions).
    versions = json.loads(client.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(
        versions + [{"name": mv.name, "version": mv.version}])})
    return str(mv.version)


def log_blip_model(
    client,
    run_id: str,
    model_dir: str | os.PathLike,
    *,
    role: str,
    registered_name: str | None = None,
    tags: dict[str, Any] | None = None,
    step: int | None = None,
    generation: dict[str, Any] | None = None,
) -> dict[str, str | None]:
    """Log the checkpoint ``model_dir`` (``config.json`` + ``model.safetensors`` + ``tokenizer/``) as
    a LoggedModel of ``run_id``'s experiment, produced by that run (at ``step``), with a
    ``python_function`` flavour for ``role`` (see ``BlipPyfunc``); the ``blip`` package ships inside
    it. ``tags`` (e.g. the ablation factors) go on the LoggedModel and, with ``registered_name``
    (``REGISTERED_NAMES[role]`` by convention), on a new version of that registered model.
    ``generation``: the captioner's default decoding (``CaptionConfig`` fields; default its
    defaults), overridable per call through ``predict(..., params=...)``. The model loads on
    ``device`` auto; ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` picks one.

    Returns ``{"model_id", "version", "model_uri"}`` (``version`` None when not registered). The
    run's status is left as it was; no fluent run is started.
    """
    import tempfile

    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model
    from mlflow.pyfunc import save_model

    if role not in ROLES:
        raise ValueError(f"role={role!r}: use one of {ROLES}")
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file() or not (model_dir / "tokenizer" / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint with its tokenizer (config.json, tokenizer/); "
                                "save it with blip.checkpoint.save_model(model, dir, tokenizer=tok)")
    meta = json.loads(config_file.read_text(encoding="utf-8"))
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    params = {"arch": str(meta.get("arch"))}
    params.update({k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
                   for k, v in flatten(meta.get("config") or {}).items()})
    defaults = _predict_defaults(role, generation)
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id, name=role, source_run_id=run_id, model_type=f"blip-{role}", params=params,
        tags={**tags, ROLE_TAG: role, "blip.checkpoint": str(model_dir.resolve()),
              "blip.checkpoint.digest": dataset_digest(model_dir)},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="blip-mlflow-") as tmp:
            local = os.path.join(tmp, "model")
            mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                                 model_id=model.model_id, metadata={ROLE_TAG: role})
            save_model(local, loader_module=__name__, data_path=str(model_dir), mlflow_model=mlflow_model,
                       code_paths=[str(Path(__file__).resolve().parents[1])],  # the blip package
                       pip_requirements=_requirements(), signature=_signature(role, defaults),
                       input_example=_input_example(role),
                       model_config={"role": role, "device": "auto", **defaults})
            client.log_model_artifacts(model.model_id, local)
        model = client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=int(step or 0))])
    version = _register(client, registered_name, model, run_id, tags) if registered_name else None
    return {"model_id": model.model_id, "version": version, "model_uri": f"models:/{model.model_id}"}


# -- the pyfunc (runs where the model is loaded: torch is imported here, not above) ------------------


def _image_bytes(value, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        return Path(value).read_bytes()
    raise ValueError(f"row {row}: image must be the image file's bytes or a path to it, got {type(value).__name__}"
                     + (f" {str(value)[:80]!r} (no such file)" if isinstance(value, (str, os.PathLike)) else ""))


def _decode(data: bytes, row: int):
    """RGB PIL image as the loader decodes it (mode conversion, downscaling, size checks)."""
    from blip.data.decode import DecodeConfig, decode_sample
    from blip.data.stats import LoaderStats
    from blip.data.tario import RawSample

    stats = LoaderStats()
    sample = decode_sample(RawSample(key=str(row), fields={"jpg": data, "txt": b"image"}), DecodeConfig(), stats)
    if sample is None:
        raise ValueError(f"row {row}: unusable image ({next(iter(stats.skipped))})")
    return sample.image


class BlipPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(DataFrame, params)`` -> ``pandas.Series``.

    captioner: columns ``image`` (bytes of an image file, or a path) and optional ``key``/``shard``;
    returns ``caption`` strings, as the ``caption`` stage writes them (prompt stripped,
    ``pre_caption``-ed). Nucleus draws are seeded per image from (``seed``, ``shard``, ``key``) as
    in the stage, so passing a web sample's key and shard file name reproduces its caption; without
    ``key`` the image's md5 stands in, so a caption never depends on its row or batch.
    filter: columns ``image`` and ``text``; returns ``p_match``, the ITM softmax p(match) the
    ``filter`` stage stores (texts cleaned as the loader cleans them, 35 tokens).
    """

    def __init__(self, checkpoint_dir: str, config: dict[str, Any]):
        from blip.capfilt.models import InferenceModel

        self.role = config.get("role", "captioner")
        self.config = config
        self.m = InferenceModel(checkpoint_dir, self.role, config.get("device", "auto"))

    def predict(self, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        need = ["image"] + (["text"] if self.role == "filter" else [])
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ValueError(f"the {self.role} needs columns {need}; missing {missing}")
        p = {**{k: v for k, v in self.config.items() if k not in ("role", "device")}, **(params or {})}
        data = [_image_bytes(v, i) for i, v in enumerate(df["image"].tolist())]
        if self.role == "captioner":
            return pd.Series(self._caption(df, data, p), index=df.index, name="caption")
        return pd.Series(self._score(df, data, p), index=df.index, name="p_match")

    def _images(self, data: list[bytes], first: int):
        import torch

        from blip.data.transforms import EvalTransform, normalize

        t = EvalTransform(self.m.image_size)
        return normalize(torch.stack([t(_decode(b, first + i)) for i, b in enumerate(data)])).to(self.m.device)

    def _caption(self, df, data: list[bytes], p: dict[str, Any]) -> list[str]:
        import torch

        from blip.capfilt.caption import image_seed
        from blip.capfilt.config import CaptionConfig
        from blip.data.text import PRETRAIN_MAX_WORDS, pre_caption

        cfg = CaptionConfig(method=str(p["method"]), top_p=float(p["top_p"]), num_beams=int(p["num_beams"]),
                            max_length=int(p["max_length"]), min_length=int(p["min_length"]), seed=int(p["seed"]),
                            batch_size=int(p["batch_size"]))
        gen = cfg.generation()
        prompt = self.m.tokenizer.prompt_ids(self.m.model.cfg.prompt)
        keys = df["key"].astype(str).tolist() if "key" in df.columns else [hashlib.md5(b).hexdigest() for b in data]
        shards = df["shard"].astype(str).tolist() if "shard" in df.columns else [""] * len(data)
        out: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(data), cfg.batch_size):
                rows = range(i, min(i + cfg.batch_size, len(data)))
                seeds = ([image_seed(cfg.seed, os.path.basename(shards[r]), keys[r]) for r in rows]
                         if cfg.method == "nucleus" else None)
                ids = self.m.model.generate(self._images(data[rows.start:rows.stop], i), prompt, gen, seeds=seeds)
                out += [pre_caption(t, PRETRAIN_MAX_WORDS) for t in self.m.decode(ids[:, len(prompt):])]
        return out

    def _score(self, df, data: list[bytes], p: dict[str, Any]) -> list[float]:
        import torch

        from blip.data.text import PRETRAIN_MAX_WORDS, pre_caption
        from blip.model.scoring import image_embeddings, itm_scores

        texts = [pre_caption(str(t), PRETRAIN_MAX_WORDS) for t in df["text"].tolist()]
        bs = int(p["batch_size"])
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(data), bs):
                emb, _ = image_embeddings(self.m.model, self._images(data[i : i + bs], i))
                ids, mask = self.m.tokenize(texts[i : i + bs], int(p["max_length"]))
                out += itm_scores(self.m.model, emb, ids, mask).prob.float().cpu().tolist()
        return out


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> BlipPyfunc:
    """MLflow's ``loader_module`` hook: ``data_path`` is the checkpoint folder copied into the model."""
    return BlipPyfunc(data_path, dict(model_config or {}))


__all__ = ["REGISTERED_NAMES", "ROLES", "BlipPyfunc", "log_blip_model"]
