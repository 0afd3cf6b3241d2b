"""Render a resolved :class:`~t2i_engine.config.schema.RunConfig` back to TOML text."""

from __future__ import annotations

import json
from typing import Any

import attrs

from t2i_engine.config.fields import HELP_META
from t2i_engine.config.schema import COMPONENT_TABLES, ComponentConfig, RunConfig
from t2i_engine.config.structure import unstructure


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {v!r} as TOML")


def helps_of(obj: Any) -> dict[str, str]:
    """``key -> help text`` of an attrs config instance (the ``help=`` of its fields)."""
    if not attrs.has(type(obj)):
        return {}
    return {f.name: " ".join(str(f.metadata[HELP_META]).split()) for f in attrs.fields(type(obj))
            if f.metadata.get(HELP_META)}


def _table(header: str, values: dict[str, Any], *, array: bool = False,
           helps: dict[str, str] | None = None) -> list[str]:
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    nested = []
    for key, v in values.items():
        note = f"  # {helps[key]}" if helps and helps.get(key) else ""
        if v is None:
            lines.append(f"# {key} = (not set){note.replace('  #', ':', 1)}")
        elif isinstance(v, dict) and v and not array:
            nested.append((key, v))
        else:
            lines.append(f"{key} = {_value(v)}{note}")
    for key, v in nested:
        lines += [""] + _table(f"{header}.{key}", v)
    return lines + [""]


def _component(c: ComponentConfig, selector: str) -> dict[str, Any]:
    values = {selector: c.name}
    if c.options is not None:
        values.update(unstructure(c.options))
    return values


def render_toml(config: RunConfig, *, explain: bool = False) -> str:
    """TOML text for ``config`` with every default filled in (comments name the providers);
    with ``explain``, each key is followed by its help text as a comment."""
    def helps(obj: Any) -> dict[str, str] | None:
        return helps_of(obj) if explain else None

    lines = [f"# resolved from {config.source}" if config.source else "# resolved config", ""]
    lines += _table("engine", unstructure(config.engine), helps=helps(config.engine))
    for table, (_, selector) in COMPONENT_TABLES.items():
        comp = getattr(config, table)
        if comp is not None:
            lines.append(f"# provided by plugin '{comp.plugin}'")
            lines += _table(table, _component(comp, selector), helps=helps(comp.options))
    for table in ("train", "guidance"):
        if getattr(config, table) is not None:
            lines += _table(table, unstructure(getattr(config, table)), helps=helps(getattr(config, table)))
    for c in config.conditioners:  # the core's keys (scale, start, end, branch, inputs), then its own
        lines.append(f"# provided by plugin '{c.plugin}'")
        keys = getattr(c, "keys", None)
        core = {} if keys is None else unstructure(keys)
        values = {"type": c.name, **core, **{k: v for k, v in _component(c, "type").items() if k != "type"}}
        lines += _table("conditioners", values, array=True,
                        helps={**helps_of(keys), **helps_of(c.options)} if explain else None)
    for a in config.adapters:
        lines += _table("adapters", unstructure(a), array=True, helps=helps(a))
    return "\n".join(lines)
