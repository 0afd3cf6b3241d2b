"""Core tasks of the training package (none yet: the plugins' train tasks call :func:`fit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TASKS: dict[str, Callable[..., Any]] = {}
"""``name -> factory`` for core training tasks, registered by the core's hookimpl module."""
