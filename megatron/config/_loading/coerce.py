"""Checking and converting raw YAML values to the declared field types, with messages a user can act on."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal, Union

from megatron.config.errors import ConfigError

_NONE = type(None)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def describe(tp: Any) -> str:
    """Human spelling of a field type ('int', 'float or null', 'list', ...)."""
    return _type_name(tp)


def _bad(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def to_float(value: Any, where: str) -> float:
    """int/float, or a numeric string such as '1e-3' (PyYAML leaves those as strings)."""
    if isinstance(value, bool):
        raise _bad(where, value, "a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _bad(where, value, "a number")


def to_int(value: Any, where: str) -> int:
    """int, or an integral float / numeric string ('1e5' -> 100000)."""
    if isinstance(value, bool):
        raise _bad(where, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise _bad(where, value, "an integer") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise _bad(where, value, "an integer")


def to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(where, value, "true or false")


def to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise _bad(where, value, "a string")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (int, float, bool, str, list, dict, Optional[...])."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and _NONE in args:
            return None
        real = [a for a in args if a is not _NONE]
        if len(real) == 1:
            return coerce(value, real[0], where)
        for arg in real:
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise _bad(where, value, describe(tp))
    if value is None:
        raise _bad(where, value, describe(tp))
    if tp is bool:
        return to_bool(value, where)
    if tp is int:
        return to_int(value, where)
    if tp is float:
        return to_float(value, where)
    if tp is str:
        return to_str(value, where)
    if origin is Literal:
        # a string here; membership is checked by validation, which also accepts other spellings (case, aliases)
        return to_str(value, where)
    base = origin or tp
    if base is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (str, int, float, bool)):
            value = [value]  # `--train-data-paths path` / `train-data-paths: path`: a one-element list
        if not isinstance(value, list):
            raise _bad(where, value, "a list")
        item_args = typing.get_args(tp)
        if item_args:
            return [coerce(v, item_args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return value
    if base is dict:
        if not isinstance(value, dict):
            raise _bad(where, value, "a mapping")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field type {tp!r} is not supported by megatron.config._loading.coerce")


def coerce_items(value: Any, item_type: type, where: str) -> Any:
    """Element-wise conversion of a list field whose items must be ``item_type`` (None passes through)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(where, value, f"a list of {item_type.__name__}")
    return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
