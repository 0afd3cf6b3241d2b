"""Field helpers for the attrs classes that components use as their ``Config``.

A component (model, sampler, task, dataset ...) declares its keys as a frozen attrs class; the
loader in :mod:`t2i_engine.config.loader` checks types from the annotations, runs the attrs
validators, and turns every failure into a :class:`~t2i_engine.errors.ConfigError` naming the
dotted key, the file and line.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

PATH_META = "t2i_path"
"""Metadata key: the value is a path or URL that must exist when the config is loaded; its value
says of which kind (``"any"``, ``"file"``, ``"dir"``)."""

HELP_META = "help"


def existing_path(*, default: Any = attrs.NOTHING, help: str = "",
                  kind: Literal["any", "file", "dir"] = "any") -> Any:
    """An ``str`` field naming a file, folder or fsspec URL that must exist at load time.

    Relative local paths are resolved against the config file's folder. With ``kind="file"``
    (or ``"dir"``) a folder (or a file) given there is refused with a message naming the key.
    """
    return attrs.field(default=default, metadata={PATH_META: kind, HELP_META: help})


def option(*, default: Any = attrs.NOTHING, help: str = "", validator: Any = None,
           factory: Any = None) -> Any:
    """A plain field with a help text (``t2i-engine config --explain`` shows it)."""
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata={HELP_META: help})
    return attrs.field(default=default, validator=validator, metadata={HELP_META: help})
