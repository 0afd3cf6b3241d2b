"""Checkpoint I/O: safetensors and sidecar files over fsspec, written atomically, loaded strictly.

:mod:`t2i_engine.checkpoint.io` holds the helpers every writer of weights uses
(:func:`atomic_write_bytes`, :func:`save_safetensors`, :func:`load_safetensors`,
:func:`safe_torch_load`, :func:`load_state_dict_strict`).
"""

# re-exported under their own names (the redundant alias marks a public re-export)
from t2i_engine.checkpoint.io import (
    atomic_write_bytes as atomic_write_bytes,
    load_safetensors as load_safetensors,
    load_state_dict_strict as load_state_dict_strict,
    read_bytes as read_bytes,
    read_json_object as read_json_object,
    safe_torch_load as safe_torch_load,
    save_safetensors as save_safetensors,
    save_torch as save_torch,
)
