"""NeMo ``.nemo`` archives: the tar members every model plugin reads.

A ``.nemo`` file is a tar holding ``model_config.yaml`` (the model's config, often under a
``model:`` key) and ``model_weights.ckpt`` (a ``torch.save``'d state dict, sometimes wrapped in
``{"state_dict": ...}``), possibly under a ``./`` prefix or a folder. What the config and keys mean
is each plugin's business (Stable Diffusion, ControlNet, Imagen); this module only opens the
archive, safely: the weights go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from t2i_engine.errors import CheckpointError

__all__ = ["CONFIG_MEMBER", "WEIGHTS_MEMBER", "archive_member", "is_nemo_archive", "read_archive_weights",
           "strip_compile_names"]

WEIGHTS_MEMBER = "model_weights.ckpt"
CONFIG_MEMBER = "model_config.yaml"


def _members(path: str) -> dict[str, str]:
    """File members by base name (``./model_config.yaml`` -> ``model_config.yaml``)."""
    with tarfile.open(path) as tar:
        return {Path(m.name).name: m.name for m in tar.getmembers() if m.isfile()}


def is_nemo_archive(path: str) -> bool:
    """Whether ``path`` is a tar file holding ``model_weights.ckpt``."""
    p = Path(path)
    return p.is_file() and tarfile.is_tarfile(p) and WEIGHTS_MEMBER in _members(path)


def archive_member(path: str, name: str) -> bytes | None:
    """The bytes of the member whose base name is ``name``, or None when the archive has none."""
    member = _members(path).get(name)
    if member is None:
        return None
    with tarfile.open(path) as tar:
        f = tar.extractfile(member)
        return f.read() if f is not None else None


def read_archive_weights(path: str) -> dict[str, Tensor]:
    """The flat state dict in ``model_weights.ckpt`` (``state_dict`` unwrapped), loaded with
    ``weights_only=True``; a missing member or anything but tensors is a :class:`CheckpointError`."""
    import torch

    raw = archive_member(path, WEIGHTS_MEMBER)
    if raw is None:
        raise CheckpointError(f"{path}: no {WEIGHTS_MEMBER} in the archive")
    try:
        sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"refusing {path}: its {WEIGHTS_MEMBER} cannot be read with "
                              f"torch.load(weights_only=True) ({e})") from e
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: {WEIGHTS_MEMBER} does not hold a flat state dict of tensors")
    return dict(sd)


def strip_compile_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the ``_orig_mod`` that ``torch.compile`` (NeMo's ``inductor: true``) puts
    into the names of a compiled module's weights, removed the way NeMo's ``init_from_ckpt`` does."""
    return {k.replace("._orig_mod", "").removeprefix("_orig_mod."): v for k, v in state.items()}
