"""A1111's ``parameters`` PNG text ("infotext"): what PNG Info, Civitai and most image tools read.

The format, as stable-diffusion-webui writes it (``create_infotext``) and reads it
(``parse_generation_parameters``)::

    a red fox, snow
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

The prompt lines come first, then ``Negative prompt:`` (only when there is one), then ONE line of
``key: value`` pairs joined by ``", "``. A value holding a comma, a colon or a newline is written
as a JSON string. ``Size`` is ``WIDTHxHEIGHT``; ``Model hash`` is the first 10 hex digits of the
checkpoint file's SHA-256 (A1111's "AutoV2" hash; see :func:`model_hash` for folders).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["A1111_SAMPLERS", "a1111_sampler_name", "format_infotext", "model_hash", "quote"]

A1111_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "plms": "PLMS",
    "pndm": "PLMS",  # the engine's pndm is the PLMS update (the same sampler function)
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "edm": "Heun",  # Heun with EDM's churn: A1111's Heun plus the "Sigma churn/tmin/tmax/noise" keys
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
}
"""Engine sampler name -> the name A1111 (and so Civitai, sd-parsers ...) uses for it."""

_KARRAS_NAMED = frozenset({"lms", "dpmpp_2m", "dpmpp_2m_sde"})
"""Samplers that A1111 before 1.9 listed with a " Karras" variant (later ones add "Schedule type")."""


def a1111_sampler_name(name: str, *, karras: bool = False) -> str:
    """A1111's name for the engine's sampler ``name`` (unknown names pass through), with the
    ``" Karras"`` suffix A1111 used for the Karras-spaced variants when ``karras``."""
    label = A1111_SAMPLERS.get(name, name)
    return f"{label} Karras" if karras and name in _KARRAS_NAMED else label


def quote(value: Any) -> str:
    """``value`` as A1111 writes it in the parameter line: JSON-quoted when it holds ``,``, ``:``
    or a newline (its reader unquotes those), else as ``str``."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_infotext(prompt: str, params: Mapping[str, Any], *, negative_prompt: str = "") -> str:
    """The ``parameters`` text: prompt, ``Negative prompt:`` line when non-empty, then the
    ``key: value`` line of ``params`` in their order (``None`` values left out)."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _file_sha256(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


@functools.lru_cache(maxsize=16)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: a changed file re-hashes
    if not os.path.isdir(path):
        return _file_sha256(path).hex()
    h = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .git, .cache, editor droppings: not part of the model
        h.update(rel.as_posix().encode() + b"\0" + _file_sha256(str(file)))
    return h.hexdigest()


def model_hash(path: str | os.PathLike[str]) -> str | None:
    """A1111's short ``Model hash``: the first 10 hex digits of a SHA-256.

    For a file, the SHA-256 of its bytes (what A1111 and Civitai show as "AutoV2"). For a folder
    (a diffusers checkpoint), the SHA-256 of, for each file in sorted relative-path order
    (files and folders whose name starts with ``.`` skipped), its relative POSIX path, one NUL
    byte and the file's own 32-byte SHA-256 digest. ``None`` for URLs other than local files
    (hashing would fetch the checkpoint again). Cached per path, size and modification time.
    """
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    stat = os.stat(text)
    if os.path.isdir(text):  # a folder's mtime misses edits inside: key on the newest file
        stamps = [(p.stat().st_size, p.stat().st_mtime_ns) for p in Path(text).rglob("*") if p.is_file()]
        size, mtime = sum(s for s, _ in stamps), max((m for _, m in stamps), default=stat.st_mtime_ns)
    else:
        size, mtime = stat.st_size, stat.st_mtime_ns
    return _cached_hash(text, size, mtime)[:10]
