"""Atomic, fsspec-aware weight I/O.

Every file the engine writes goes through :func:`atomic_write_bytes`: the bytes are written to a
temporary name beside the target and then renamed over it (``os.replace`` locally, ``fs.mv`` on
other fsspec filesystems), so a reader never sees a half-written file under the final name.
Weights are safetensors; anything pickled is read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import torch
from torch import Tensor, nn

from t2i_engine.errors import CheckpointError, storage_error

__all__ = [
    "atomic_write_bytes",
    "load_safetensors",
    "load_state_dict_strict",
    "read_bytes",
    "read_json_object",
    "safe_torch_load",
    "save_safetensors",
    "save_torch",
]


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    name = f".{tail}.tmp-{uuid.uuid4().hex[:12]}"
    return f"{head}/{name}" if head else name


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` (a path or fsspec URL) atomically.

    The data goes to a hidden temporary name in the same folder first; only once it is complete
    (and fsynced, for local files) is it renamed to ``url``. A crash mid-write leaves the old
    file (if any) untouched; the stray temporary file is ignored by every reader. A write that
    fails (no space, read-only, no permission, a folder in the way) removes its temporary and
    raises :class:`~t2i_engine.errors.StorageError` naming ``url`` and the cause.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rpartition("/")[0]
    tmp = _tmp_name(path)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        _write_then_rename(fs, tmp, path, data)
    except OSError as exc:
        with contextlib.suppress(Exception):  # it may never have been created
            fs.rm(tmp)
        raise storage_error("write", url, exc) from exc


def _write_then_rename(fs: Any, tmp: str, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
        return
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)  # object stores: the final name appears only once the upload completed


def read_bytes(url: str) -> bytes:
    """Read a whole file from a path or fsspec URL; a missing file is a :class:`CheckpointError`."""
    fs, path = fsspec.core.url_to_fs(url)
    with _reading(url), fs.open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """A missing file as a :class:`CheckpointError`, any other ``OSError`` (a folder where the file
    should be, no permission, an I/O error) as a :class:`~t2i_engine.errors.StorageError`."""
    try:
        yield
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file not found: {url}") from e
    except OSError as e:
        raise storage_error("read", url, e) from e


def save_safetensors(tensors: Mapping[str, Tensor], url: str, *,
                     metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Save a flat ``name -> tensor`` mapping as safetensors at ``url``, atomically.

    Tensors are made contiguous and moved to the CPU; tensors sharing storage are cloned
    (safetensors refuses shared storage). With ``dtype``, floating-point tensors are stored in it
    (e.g. ``torch.float16`` for a smaller export); integer tensors are kept as they are.
    """
    from safetensors.torch import save

    def prepare(v: Tensor) -> Tensor:
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v.contiguous().clone()

    clean = {k: prepare(v) for k, v in tensors.items()}
    atomic_write_bytes(url, save(clean, metadata=dict(metadata) if metadata else None))


def load_safetensors(url: str, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file from a path or fsspec URL into a ``name -> tensor`` dict.

    A local file is memory-mapped: its tensors read their pages from the file as they are used
    (copy-on-write: changing a tensor does not change the file), so the weights are in memory
    once. A remote file is read whole first (its bytes and the tensors: twice its size at the
    peak).
    """
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        return _load_safetensors_bytes(read_bytes(url), url, device)
    from safetensors import safe_open

    with _reading(url), open(path, "rb"):  # missing, a folder, no permission: read_bytes' errors
        pass
    try:
        with safe_open(path, framework="pt", device=str(torch.device(device))) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{url} is not a readable safetensors file: {e}") from e


def _load_safetensors_bytes(data: bytes, url: str, device: str | torch.device) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{url} is not a readable safetensors file: {e}") from e
    return {k: v.to(device) for k, v in tensors.items()}


def save_torch(obj: Any, url: str) -> None:
    """``torch.save`` ``obj`` to ``url`` atomically; keep it loadable with ``weights_only=True``
    (tensors, numbers, strings, lists, tuples and dicts only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(url, buf.getvalue())


def safe_torch_load(url: str, *, map_location: str | torch.device = "cpu", inert_globals: bool = False) -> Any:
    """Load a pickled file (``.pt``, ``.ckpt``, ``.pth``) with ``torch.load(weights_only=True)``.

    Anything that needs arbitrary code to unpickle is refused with a :class:`CheckpointError`
    that explains why, instead of being executed. With ``inert_globals`` every global outside
    torch's allowlist (``torch.serialization.get_unsafe_globals_in_checkpoint``: e.g. the
    OmegaConf ``hyper_parameters`` NeMo's Lightning checkpoints pickle) is read as an inert
    placeholder that keeps its data and runs no code (torch still blocks ``os``/``sys``); the
    caller must then check that what it takes are tensors.
    """
    data = read_bytes(url)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) if inert_globals else []
        with torch.serialization.safe_globals([(_inert(name), name) for name in unsafe]):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"refusing to load {url}: it cannot be read with torch.load(weights_only=True) ({e}). "
            "Pickles that need arbitrary code are not loaded; convert the file to safetensors "
            "with a trusted tool first.") from e


def _inert(name: str) -> type:
    """A placeholder class for the pickled global ``name``: it keeps what the pickle hands it
    (arguments, state) and runs nothing."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self: Any, state: Any) -> None:
        self.state = state

    return type(name.rsplit(".", 1)[-1], (), {"__init__": __init__, "__setstate__": __setstate__,
                                               "__doc__": f"inert stand-in for {name}"})


def load_state_dict_strict(module: nn.Module, state: Mapping[str, Tensor], *,
                           source: str = "checkpoint", assign: bool = False) -> None:
    """Load ``state`` into ``module``; missing or unexpected keys, or a shape mismatch, are a
    :class:`CheckpointError` that lists them (the first 20 of each). ``assign``: the tensors
    become the module's parameters and buffers (``nn.Module.load_state_dict(assign=True)``: for a
    module built on the meta device)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", wrong)):
            if keys:
                more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                if label == "shape mismatches":
                    shown = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in keys[:20]]
                else:
                    shown = keys[:20]
                parts.append(f"{label} ({len(keys)}): {', '.join(shown)}{more}")
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True, assign=assign)


def read_json_object(path: str | os.PathLike[str], *, required: bool = True) -> dict[str, Any]:
    """The JSON object in a checkpoint's config file (``{}`` when the file is absent and not
    ``required``); a missing, unreadable or non-object file is a CheckpointError naming it."""
    text = os.fspath(path)
    if not os.path.isfile(text):
        if required:
            raise CheckpointError(f"{text} is missing: the checkpoint's architecture is read from it")
        return {}
    try:
        with open(text, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{text} is not a readable JSON file: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{text} does not hold a JSON object")
    return value
