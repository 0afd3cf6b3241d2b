"""The ``[[adapters]]`` table of a job TOML and the call every task makes with it.

.. code-block:: toml

    [[adapters]]
    path = "loras/style.safetensors"   # kohya, diffusers/PEFT file or folder, legacy .bin, NeMo .nemo
    multiplier = 0.8                   # W x + up(down(x)) * multiplier * alpha / rank
    partial = false                    # true: keys matching no module are reported, not refused
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from torch import nn

from t2i_engine.adapters.attach import Adapter
from t2i_engine.adapters.load import LoadReport, load_lora
from t2i_engine.config.fields import existing_path, option
from t2i_engine.config.structure import Locate, structure
from t2i_engine.errors import CheckpointError, ConfigError

__all__ = ["AdapterEntry", "apply_adapters", "structure_adapters"]


@attrs.frozen
class AdapterEntry:
    """One ``[[adapters]]`` table: a LoRA applied to the job's model."""

    path: str = existing_path(help="LoRA file or folder: kohya, diffusers/PEFT, legacy diffusers .bin, NeMo .nemo")
    multiplier: float = option(default=1.0, help="strength: W x + up(down(x)) * multiplier * alpha / rank")
    partial: bool = option(default=False, help="accept a file whose keys do not all match the model (reports "
                                               "the count) instead of refusing it")


def structure_adapters(value: Any, locate: Locate | None = None) -> list[AdapterEntry]:
    """The parsed ``adapters`` value of a job TOML (an array of tables) as entries; errors name
    ``adapters[i].key`` (and the file and line when ``locate`` is the loader's locator)."""
    where = locate or (lambda key: "")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"adapters: expected an array of tables ([[adapters]]){where('adapters')}")
    return [structure(AdapterEntry, table, f"adapters[{i}]", where) for i, table in enumerate(value)]


def apply_adapters(model: nn.Module, entries: Sequence[AdapterEntry]) -> list[tuple[Adapter, LoadReport]]:
    """Attach every entry's LoRA to ``model`` (after it is on its device), in order.

    ``model`` must provide ``lora_key_map() -> KeyMap`` (its plugin's spellings of its modules);
    a model without one and a file that does not fit are errors naming the entry.
    """
    if not entries:
        return []
    key_map: Any = getattr(model, "lora_key_map", None)
    if key_map is None:
        raise ConfigError(f"adapters: the model {type(model).__name__} does not support LoRA adapters (its plugin "
                          f"gives no lora_key_map)")
    keymap = key_map()
    loaded = []
    for i, entry in enumerate(entries):
        try:
            loaded.append(load_lora(model, entry.path, keymap, multiplier=entry.multiplier, partial=entry.partial))
        except CheckpointError as e:
            raise ConfigError(f"adapters[{i}].path: {e}") from e
    return loaded
