"""A malformed, tagged or non-mapping YAML beside a single file or inside a .nemo archive is a
CheckpointError naming the file (and line), never a raw yaml exception or code run by a tag."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from t2i_engine.errors import CheckpointError
from t2i_plugin_sd.formats import SingleFile, load_checkpoint
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

BAD_YAML = [
    (b"model:\n  params: [unclosed\n", r"not a readable YAML config at line \d+"),
    (b"model: !!python/object/apply:os.system ['echo pwned']\n", "not a readable YAML config"),
    (b"- just\n- a list\n", "expected a YAML mapping"),
]


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sf") / "m.safetensors"
    SingleFile().save(build_model(None, PRESETS["tiny"]), str(path))
    return str(path)


@pytest.mark.parametrize(("text", "expected"), BAD_YAML)
def test_bad_yaml_beside_a_single_file(single_file: str, text: bytes, expected: str) -> None:
    side = single_file.removesuffix(".safetensors") + ".yaml"
    good = open(side, "rb").read()
    try:
        open(side, "wb").write(text)
        with pytest.raises(CheckpointError, match=rf"m\.yaml: {expected}"):
            load_checkpoint(single_file, format="single-file")
    finally:
        open(side, "wb").write(good)


@pytest.mark.parametrize(("text", "expected"), BAD_YAML)
def test_bad_yaml_inside_a_nemo_archive(single_file: str, tmp_path, text: bytes, expected: str) -> None:
    buf = io.BytesIO()
    torch.save({"model." + k: v for k, v in load_file(single_file).items()}, buf)
    with tarfile.open(tmp_path / "m.nemo", "w") as tar:
        for name, data in (("model_weights.ckpt", buf.getvalue()), ("model_config.yaml", text)):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CheckpointError, match=rf"m\.nemo:(\./)?model_config\.yaml: {expected}"):
        load_checkpoint(str(tmp_path / "m.nemo"), format="nemo")
