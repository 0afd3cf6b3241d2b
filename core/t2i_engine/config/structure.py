"""Turn a parsed TOML table into an attrs instance, checking every key against its schema.

Every failure is a :class:`~t2i_engine.errors.ConfigError` naming the dotted key; the caller's
``locate`` function adds the file and line.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

import attrs

from t2i_engine.config.fields import PATH_META
from t2i_engine.config.limits import INT64_MAX, INT64_MIN
from t2i_engine.errors import ConfigError

Locate = Callable[[str], str]
"""dotted key -> `` (file:line)`` or an empty string."""


def _no_location(_: str) -> str:
    return ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a table"
    if tp is type(None):
        return "nothing (omit the key)"
    if attrs.has(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false)"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _shape_of(value: Any) -> str:
    """How a TOML value was written, for messages: ``[[x]]`` arrays of tables, scalars."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return "an array of tables ([[...]])"
    return f"{value!r}"


def _fail(path: str, tp: Any, value: Any, locate: Locate) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}{locate(path)}")


def convert(value: Any, tp: Any, path: str, locate: Locate = _no_location) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float and nested tables."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise _fail(path, tp, value, locate)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path, locate)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(path, tp, value, locate)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _fail(path, tp, value, locate)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}{locate(path)}")
            return tuple(convert(v, a, f"{path}[{i}]", locate) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [convert(v, item, f"{path}[{i}]", locate) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, dict):
            raise _fail(path, tp, value, locate)
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: convert(v, vt, f"{path}.{k}", locate) for k, v in value.items()}
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise _fail(path, tp, value, locate)
        return structure(tp, value, path, locate)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, tp, value, locate)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:  # tomllib reads any size; TOML allows 64 bits
                raise ConfigError(f"{path}: {value} is out of range; integers must lie between "
                                  f"-2**63 and 2**63-1{locate(path)}")
            return value
        raise _fail(path, tp, value, locate)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _fail(path, tp, value, locate)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(path, tp, value, locate)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _fail(path, tp, value, locate)
    return value


def structure(cls: type, table: Mapping[str, Any], path: str, locate: Locate = _no_location,
              *, ignore: tuple[str, ...] = ()) -> Any:
    """Build ``cls`` (an attrs class) from ``table``; keys in ``ignore`` are skipped.

    Unknown keys, missing required keys, wrong types and validator failures all raise
    ConfigError with the dotted key (``path.key``).
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: expected a table ([{path}] with key = value lines), got "
                          f"{_shape_of(table)}{locate(path)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in ignore:
            continue
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            from t2i_engine.plugins.manager import did_you_mean

            valid = ", ".join(sorted(fields)) or "none"
            raise ConfigError(
                f"{dotted}: unknown key{did_you_mean(key, fields)}; valid keys here: {valid}"
                f"{locate(dotted)}"
            )
        f = fields[key]
        converted = convert(value, hints.get(key, Any), dotted, locate)
        if f.metadata.get(PATH_META) and isinstance(converted, (str, list)):
            from t2i_engine.config.paths import check_exists

            kind = f.metadata[PATH_META]
            kind = "any" if kind is True else kind
            if isinstance(converted, str):
                converted = check_exists(dotted, converted, locate, kind=kind)
            else:  # a list of paths (e.g. one image per prompt): each one checked and resolved
                converted = [check_exists(f"{dotted}[{i}]", v, locate, kind=kind) if isinstance(v, str) else v
                             for i, v in enumerate(converted)]
        kwargs[f.alias if f.alias else key] = converted
    missing = [f.name for f in fields.values()
               if f.default is attrs.NOTHING and f.name not in table and f.init]
    if missing:
        dotted = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(f"{dotted}: required key is missing{locate(path)}")
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - a plugin's validator may raise anything: name the key
        # attrs validators: "'steps' must be >= 1: 0" -> name the dotted key; else find whose validator says so
        bad = next((k for k in kwargs if f"'{k}'" in str(exc)), None) or _failing_field(fields, kwargs, exc)
        dotted = (f"{path}.{bad}" if path else bad) if bad else path
        message = str(exc)
        if bad and message.startswith(f"'{bad}' "):
            message = message[len(bad) + 3:]
        raise ConfigError(f"{dotted}: {message}{locate(dotted or '')}") from exc


def _failing_field(fields: Mapping[str, Any], kwargs: Mapping[str, Any], exc: BaseException) -> str | None:
    """The key whose own converter and validator raise ``exc`` again (same type and message), so a
    plugin's validator that does not name its field is still placed at its key and line."""
    for f in fields.values():
        name = f.alias if f.alias else f.name
        if name not in kwargs or (f.validator is None and f.converter is None):
            continue
        try:
            value = f.converter(kwargs[name]) if callable(f.converter) else kwargs[name]
            if f.validator is not None:
                f.validator(None, f, value)
        except Exception as again:  # noqa: BLE001 - compared with the original below
            if type(again) is type(exc) and str(again) == str(exc):
                return f.name
    return None


def unstructure(obj: Any) -> Any:
    """attrs instance -> plain dict/list/scalars (for printing the resolved config)."""
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, list | tuple):
        return [unstructure(v) for v in obj]
    if isinstance(obj, dict):
        return {k: unstructure(v) for k, v in obj.items()}
    return obj
