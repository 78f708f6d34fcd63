"""Typed configs from mappings: :func:`build` is the project's one dict → dataclass builder.

``params.yaml`` sections (``blip.params``), model presets and checkpoint configs
(``blip.model.config``) all go through it, so an unknown key, a wrong type or a value a dataclass
refuses fails the same way everywhere: a :class:`ConfigError` naming the dotted key and what is
allowed. A leaf module: it imports nothing from ``blip``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is missing, unknown or of the wrong type/value (the message names the key)."""


def build(cls: type[T], d: dict[str, Any], where: str = "") -> T:
    """Dataclass ``cls`` from mapping ``d`` — the one dict→dataclass builder of the project.
    Nested dataclass fields are built recursively; unknown keys, wrong types and the dataclass's own
    checks (allowed values) fail with a :class:`ConfigError` naming ``where.key``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        key = f"{where}.{k}" if where else str(k)
        if k not in fields:
            raise ConfigError(f"unknown key {key}; allowed keys: {', '.join(sorted(f for f in fields if f != 'raw'))}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            kwargs[k] = build(hints[k], v, key)
            continue
        v = _float_literal(v, hints[k])
        try:
            _check_type(key, v, hints[k])
        except TypeError as e:
            raise ConfigError(str(e)) from None
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # the dataclass's own checks
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _float_literal(value: Any, hint: Any) -> Any:
    """``"1e-4"`` → ``0.0001`` for a float field: YAML 1.1 (PyYAML, ``dvc exp run -S``) reads an
    exponent without a dot as a string, and everyone writes learning rates that way."""
    wants_float = hint is float or float in typing.get_args(hint)
    if wants_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        for opt in options:
            try:
                _check_type(key, value, opt)
                return
            except TypeError:
                continue
        raise TypeError(f"{key}={value!r}: expected one of {[getattr(o, '__name__', str(o)) for o in options]}")
    if hint is type(None):
        ok = value is None
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool):
        ok = isinstance(value, hint)
    elif origin in (list, tuple) or hint in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif origin is dict or hint is dict:
        ok = isinstance(value, dict)
    elif dataclasses.is_dataclass(hint):
        ok = False  # a section given as something other than a mapping
    else:
        ok = True
    if not ok:
        raise TypeError(f"{key}={value!r}: expected {getattr(hint, '__name__', str(hint))}")
