"""The core keys of every ``[[conditioners]]`` entry and how the loader reads them.

Each entry holds its ``type``, the keys below (owned by the core, the same for every
conditioner) and the conditioner's own keys (its ``Config``)::

    [[conditioners]]
    type = "my-hint"          # the registered conditioner
    scale = 0.8               # multiplies its effect; 0 = exactly no effect
    start = 0.0               # active from this fraction of the sampling steps ...
    end = 0.6                 # ... to this one
    branch = "both"           # "cond" (ControlNet's guess mode), "uncond" or "both"
    inputs = { hint = "edges.png" }   # images by path or fsspec URL, passed to condition()
    strength = 2.0            # the conditioner's own keys
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from t2i_engine.config.fields import option
from t2i_engine.config.schema import ComponentConfig
from t2i_engine.config.structure import Locate, structure
from t2i_engine.errors import ConfigError

__all__ = ["CORE_KEYS", "ConditionerConfig", "ConditionerKeys", "resolve_conditioners"]

_fraction = [attrs.validators.ge(0.0), attrs.validators.le(1.0)]


@attrs.frozen
class ConditionerKeys:
    """The core's keys of one ``[[conditioners]]`` entry (see the module docstring)."""

    scale: float = option(default=1.0, help="multiplies the conditioner's effect (0 = exactly none)")
    start: float = option(default=0.0, validator=_fraction, help="first fraction of the sampling steps it acts on")
    end: float = option(default=1.0, validator=_fraction, help="last fraction of the sampling steps it acts on")
    branch: Literal["cond", "uncond", "both"] = option(
        default="both", help="guidance branch it applies to: cond (guess mode), uncond or both")
    inputs: dict[str, str] = option(factory=dict, help="named images (path or fsspec URL) given to condition()")

    def __attrs_post_init__(self) -> None:
        if self.start >= self.end:
            raise ValueError(f"'end' must be greater than start ({self.start}), got {self.end}")


CORE_KEYS: tuple[str, ...] = tuple(f.name for f in attrs.fields(ConditionerKeys))


@attrs.frozen
class ConditionerConfig(ComponentConfig):
    """A selected conditioner: the component, its core keys and where the entry was written."""

    keys: ConditionerKeys = attrs.field(factory=ConditionerKeys)
    where: str = ""  # " (file:line)" of the entry, for errors raised when it is built


def _entry(pm: Any, i: int, table: Any, locate: Locate) -> ConditionerConfig:
    from t2i_engine.config.loader import _component
    from t2i_engine.config.paths import check_exists

    key = f"conditioners[{i}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{key}: expected a table, got {table!r}{locate(key)}")
    own = {k: v for k, v in table.items() if k not in CORE_KEYS}
    component = _component(pm, key, own, locate, kind="conditioner", selector="type")
    schema = getattr(pm.get("conditioner", component.name).factory, "Config", None)
    taken = [f.name for f in attrs.fields(schema) if f.name in CORE_KEYS] if attrs.has(schema) else []
    if taken:
        raise ConfigError(f"{key}.type: conditioner '{component.name}' (plugin '{component.plugin}') declares "
                          f"the key '{taken[0]}', which every [[conditioners]] entry reserves for the core "
                          f"({', '.join(CORE_KEYS)}); rename it in the plugin{locate(f'{key}.type')}")
    keys = structure(ConditionerKeys, {k: v for k, v in table.items() if k in CORE_KEYS}, key, locate)
    inputs = {name: check_exists(f"{key}.inputs.{name}", url, locate, kind="file")
              for name, url in keys.inputs.items()}
    return ConditionerConfig(kind=component.kind, name=component.name, options=component.options,
                             plugin=component.plugin, keys=attrs.evolve(keys, inputs=inputs), where=locate(key))


def resolve_conditioners(pm: Any, data: Any, locate: Locate) -> list[ConditionerConfig]:
    """The ``[[conditioners]]`` array of a parsed config, validated (core keys and each
    conditioner's own ``Config``); every error names the key and its line."""
    if not isinstance(data, list):
        raise ConfigError(f"conditioners: expected an array of tables ([[conditioners]]){locate('conditioners')}")
    return [_entry(pm, i, table, locate) for i, table in enumerate(data)]
