"""Exceptions the engine raises on purpose: each carries a message meant for a person.

The CLI prints ``str(error)`` and exits with :attr:`T2IError.exit_code` (no traceback unless
``--debug``); library users catch them like any exception.
"""

from __future__ import annotations


class T2IError(Exception):
    """Base of the engine's own errors."""

    exit_code: int = 1


class ConfigError(T2IError, ValueError):
    """A configuration value, key, file or component name is wrong (CLI exit status 2)."""

    exit_code = 2


class PluginError(T2IError):
    """A plugin failed to load, clashes with another, or is missing (CLI exit status 2)."""

    exit_code = 2


class CheckpointError(T2IError):
    """A checkpoint file is unreadable, of an unknown format, or does not fit the model."""

    exit_code = 2


class StorageError(T2IError):
    """A file or folder could not be written or read: no space, read-only, no permission, a
    folder where a file belongs (CLI exit status 1; the message names the path and the cause)."""


def storage_error(action: str, path: str, exc: OSError) -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while doing ``action`` (``"write"``) on
    ``path``: ``cannot write '/out/x.png': No space left on device``."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return StorageError(f"cannot {action} '{path}': {cause}")


class DataError(T2IError):
    """A dataset is unusable (too many corrupt samples, an empty folder ...)."""


class TrainingError(T2IError):
    """Training cannot go on (too many non-finite losses in a row ...)."""
