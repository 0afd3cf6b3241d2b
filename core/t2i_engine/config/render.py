"""Render a resolved :class:`~t2i_engine.config.schema.RunConfig` back to TOML text."""

from __future__ import annotations

import json
from typing import Any

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


def _table(header: str, values: dict[str, Any], *, array: bool = False) -> list[str]:
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    nested = []
    for key, v in values.items():
        if v is None:
            lines.append(f"# {key} = (not set)")
        elif isinstance(v, dict) and v and not array:
            nested.append((key, v))
        else:
            lines.append(f"{key} = {_value(v)}")
    for key, v in nested:
        lines += [""] + _table(f"{header}.{key}", v)
    return lines + [""]


def _component(c: ComponentConfig, selector: str) -> dict[str, Any]:
    values = {selector: c.name}
    if c.options is not None:
        values.update(unstructure(c.options))
    return values


def render_toml(config: RunConfig) -> str:
    """TOML text for ``config`` with every default filled in (comments name the providers)."""
    lines = [f"# resolved from {config.source}" if config.source else "# resolved config", ""]
    lines += _table("engine", unstructure(config.engine))
    for table, (_, selector) in COMPONENT_TABLES.items():
        comp = getattr(config, table)
        if comp is not None:
            lines.append(f"# provided by plugin '{comp.plugin}'")
            lines += _table(table, _component(comp, selector))
    for table in ("train", "guidance"):
        if getattr(config, table) is not None:
            lines += _table(table, unstructure(getattr(config, table)))
    for c in config.conditioners:
        lines.append(f"# provided by plugin '{c.plugin}'")
        lines += _table("conditioners", _component(c, "type"), array=True)
    return "\n".join(lines)
