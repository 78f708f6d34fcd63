"""``params.yaml``: load, override (``--set a.b=v``) and validate one stage's section.

Validation happens at load time: an unknown key or a value of the wrong type fails with the
dotted key's name and what is allowed, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """A parameter is missing, unknown or of the wrong type/value (message names the key)."""


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the project root or pass --params")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    for item in overrides or []:
        apply_override(params, item)
    return params


def apply_override(params: dict[str, Any], item: str) -> None:
    """``"pretrain.epochs=3"`` → ``params["pretrain"]["epochs"] = 3`` (value parsed as YAML)."""
    if "=" not in item:
        raise ParamsError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = params
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params:
        raise ParamsError(f"params has no section {name!r}; sections: {sorted(params)}")
    return copy.deepcopy(params[name]) or {}


def build(cls: type[T], d: dict[str, Any], where: str) -> T:
    """Dataclass ``cls`` from mapping ``d``; unknown keys and wrong types name ``where.key``."""
    if not isinstance(d, dict):
        raise ParamsError(f"{where} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    d = dict(d)
    for k, v in d.items():
        if k not in fields:
            raise ParamsError(f"unknown key {where}.{k}; allowed keys: {', '.join(sorted(fields))}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            d[k] = build(hints[k], v, f"{where}.{k}")  # nested section
            continue
        try:
            _check_type(f"{where}.{k}", v, hints[k])
        except TypeError as e:
            raise ParamsError(str(e)) from None
    try:
        return cls(**d)
    except (ValueError, TypeError) as e:  # the dataclass's own checks (allowed values)
        raise ParamsError(f"{where}: {e}") from None


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options = typing.get_args(hint)
        errors = []
        for opt in options:
            try:
                _check_type(key, value, opt)
                return
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(f"{key}={value!r}: expected one of {[getattr(o, '__name__', str(o)) for o in options]}")
    if hint is type(None):
        if value is not None:
            raise TypeError(f"{key}={value!r}: expected null")
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool):
        ok = isinstance(value, hint)
    elif origin in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif origin is dict or hint is dict:
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise TypeError(f"{key}={value!r}: expected {getattr(hint, '__name__', str(hint))}")
