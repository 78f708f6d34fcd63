"""Edit ``params.yaml`` in place, keeping its comments, and validate it.

Overrides from outside (a Prefect deployment's parameters, the ``smoke`` variant) are written
into ``params.yaml`` itself, so DVC sees them as params and ``dvc.lock`` records what ran —
never passed behind DVC's back. Variants are overlay files beside it: ``params-<name>.yaml``
holds only the keys that differ.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..params import ParamsError, load_params
from ..schema import validate


def _yaml():
    # DVC's own YAML library: round-trips comments and layout
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 120
    return y


def load(root: str | Path = ".", name: str = "params.yaml") -> dict[str, Any]:
    """The validated parameters of the project at ``root``."""
    params = load_params(Path(root) / name)
    validate(params)
    return params


def _merge(node, overlay: dict, where: str = "") -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _merge(node[key], value, f"{where}{key}.")
        else:
            node[key] = value


def set_params(path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``{"section.key": value}`` (or nested ``{"section": {"key": value}}``) to the file at
    ``path``; the result is validated before anything is written. Returns the new parameters."""
    path = Path(path)
    y = _yaml()
    doc = y.load(path.read_text())
    for key, value in overrides.items():
        node = doc
        parts = str(key).split(".")
        for p in parts[:-1]:
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ParamsError(f"override {key!r}: {p!r} is not a section of {path}")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    buf = io.StringIO()
    y.dump(doc, buf)
    import yaml

    params = yaml.safe_load(buf.getvalue())
    try:
        validate(params)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    path.write_text(buf.getvalue())
    return params


def variant_path(params_path: str | Path, name: str) -> Path:
    p = Path(params_path)
    return p.with_name(f"{p.stem}-{name}{p.suffix}")


def apply_variant(params_path: str | Path, name: str) -> dict[str, Any]:
    """Overlay ``params-<name>.yaml`` onto ``params.yaml`` (e.g. ``smoke`` for CI)."""
    overlay_path = variant_path(params_path, name)
    if not overlay_path.is_file():
        have = sorted(q.stem.split("-", 1)[1] for q in Path(params_path).parent.glob(f"{Path(params_path).stem}-*.yaml"))
        raise ParamsError(f"variant {name!r}: {overlay_path} not found; variants here: {have or 'none'}")
    import yaml

    overlay = yaml.safe_load(overlay_path.read_text()) or {}
    return set_params(params_path, {k: v for k, v in overlay.items()})
