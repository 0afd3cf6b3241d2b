"""Existence checks for path-valued config keys (local paths and fsspec URLs).

Relative local paths are resolved against the folder of the config file being loaded
(:data:`BASE_DIR`, set by the loader), so a config runs the same from any working directory.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import fsspec

from t2i_engine.errors import ConfigError

BASE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("t2i_config_base_dir", default=None)


def resolve(url: str) -> str:
    """Absolute form of a local relative path; URLs with a protocol are returned as they are."""
    if "://" in url:
        return url
    path = Path(url).expanduser()
    base = BASE_DIR.get()
    if not path.is_absolute() and base is not None:
        candidate = base / path
        if candidate.exists() or not path.exists():
            path = candidate
    return str(path)


def check_exists(key: str, url: str, locate: Callable[[str], str], *,
                 kind: Literal["any", "file", "dir"] = "any") -> str:
    """Resolve ``url`` and raise ConfigError naming ``key`` when nothing exists there, or when
    it is a folder where a file is expected (``kind="file"``) or the reverse (``kind="dir"``)."""
    resolved = resolve(url)
    try:
        fs, path = fsspec.core.url_to_fs(resolved)
        exists = fs.exists(path)
        is_dir = exists and fs.isdir(path)
    except ImportError as exc:  # e.g. s3:// without s3fs
        raise ConfigError(f"{key}: cannot open '{url}': {exc}{locate(key)}") from exc
    except Exception:  # noqa: BLE001 - any backend failure means we cannot vouch for it
        exists = is_dir = False
    if not exists:
        raise ConfigError(f"{key}: path does not exist: '{url}'{locate(key)}")
    if kind == "file" and is_dir:
        raise ConfigError(f"{key}: '{url}' is a folder; a file is expected here{locate(key)}")
    if kind == "dir" and not is_dir:
        raise ConfigError(f"{key}: '{url}' is a file; a folder is expected here{locate(key)}")
    return resolved
