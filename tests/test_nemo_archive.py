"""core checkpoint.nemo: opening ``.nemo`` tars the way NeMo writes them (``./`` prefixes, a
``state_dict`` wrapper), and refusing what is not a flat state dict or not loadable safely."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from t2i_engine.checkpoint.nemo import archive_member, is_nemo_archive, read_archive_weights
from t2i_engine.errors import CheckpointError


def _archive(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_members_are_found_by_base_name_and_the_state_dict_wrapper_is_unwrapped(tmp_path):
    w = {"model.a": torch.arange(3.0)}
    path = _archive(tmp_path / "m.nemo", {"./model_config.yaml": b"model: {x: 1}\n",
                                          "./sub/model_weights.ckpt": _saved({"state_dict": w})})
    assert is_nemo_archive(path)
    assert archive_member(path, "model_config.yaml") == b"model: {x: 1}\n"
    assert archive_member(path, "absent.yaml") is None
    got = read_archive_weights(path)
    assert list(got) == ["model.a"] and torch.equal(got["model.a"], w["model.a"])


def test_not_an_archive_or_no_weights(tmp_path):
    (tmp_path / "plain.nemo").write_bytes(b"not a tar")
    assert not is_nemo_archive(str(tmp_path / "plain.nemo"))
    assert not is_nemo_archive(str(tmp_path / "missing.nemo"))
    path = _archive(tmp_path / "cfg-only.nemo", {"model_config.yaml": b"{}"})
    assert not is_nemo_archive(path)
    with pytest.raises(CheckpointError, match="no model_weights.ckpt"):
        read_archive_weights(path)


class _Payload:  # an arbitrary pickled object: weights_only loading must refuse it
    pass


def test_unsafe_or_nested_weights_are_refused(tmp_path):
    path = _archive(tmp_path / "evil.nemo", {"model_weights.ckpt": _saved({"w": _Payload()})})
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        read_archive_weights(path)
    path = _archive(tmp_path / "nested.nemo", {"model_weights.ckpt": _saved({"w": {"x": torch.ones(1)}})})
    with pytest.raises(CheckpointError, match="flat state dict of tensors"):
        read_archive_weights(path)
