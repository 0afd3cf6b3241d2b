"""Checkpoint I/O: safetensors and sidecar files over fsspec, written atomically, loaded strictly.

:mod:`t2i_engine.checkpoint.io` holds the helpers every writer of weights uses
(:func:`atomic_write_bytes`, :func:`save_safetensors`, :func:`load_safetensors`,
:func:`safe_torch_load`, :func:`load_state_dict_strict`).
"""

from t2i_engine.checkpoint.io import (
    atomic_write_bytes,
    load_safetensors,
    load_state_dict_strict,
    read_bytes,
    safe_torch_load,
    save_safetensors,
    save_torch,
)

from t2i_engine.checkpoint.io import __all__ as __all__  # the one list of exported names
