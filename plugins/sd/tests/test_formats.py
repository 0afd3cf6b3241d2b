"""Checkpoint round trips and bad input."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2i_engine.errors import CheckpointError
from t2i_plugin_sd.formats import DiffusersFolder, NemoArchive, SingleFile, detect_format, load_checkpoint
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore:.*latent-diffusion yaml cannot express")


def same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_diffusers_round_trip_and_diffusers_loads_export(sd1_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, folder = sd1_folder
    model = build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])
    DiffusersFolder().save(model, str(tmp_path / "out"))
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        same(load_file(tmp_path / "out" / sub / f"{name}.safetensors"), load_file(folder / sub / f"{name}.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.unet.config.block_out_channels == list(model.arch.unet.channels)


@pytest.mark.parametrize("layout", ["tiny", "tiny-2"])
def test_single_file_round_trip(layout, tmp_path):
    model = build_model(None, PRESETS[layout], seed=1)
    SingleFile().save(model, str(tmp_path / "a.safetensors"))
    first = load_file(tmp_path / "a.safetensors")
    first["model_ema.decay"] = torch.tensor(0.999)  # a tensor we do not model survives
    save_file(first, tmp_path / "b.safetensors")
    assert isinstance(detect_format(str(tmp_path / "b.safetensors")), SingleFile)
    # b lost the metadata and has no yaml: the heads come from the preset the user names
    again = build_model(load_checkpoint(str(tmp_path / "b.safetensors")), PRESETS[layout], explicit=True)
    SingleFile().save(again, str(tmp_path / "c.safetensors"))
    same(load_file(tmp_path / "c.safetensors"), first)
    assert again.arch.text.skip_last_layers == PRESETS[layout].text.skip_last_layers
    # c carries the engine's record: it rebuilds the same architecture with no preset at all
    assert build_model(load_checkpoint(str(tmp_path / "c.safetensors")), PRESETS["sd-1"]).arch == model.arch


def test_single_file_equals_diffusers_model(sd1_folder, tmp_path):
    _, folder = sd1_folder
    model = build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])
    SingleFile().save(model, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": load_file(tmp_path / "m.safetensors")}, tmp_path / "m.ckpt")
    # the pickle has no metadata; m.yaml beside it carries the UNet heads, not the text tower's
    with pytest.raises(CheckpointError, match="text_heads"):
        build_model(load_checkpoint(str(tmp_path / "m.ckpt")), PRESETS["sd-1"])
    other = build_model(load_checkpoint(str(tmp_path / "m.ckpt")), PRESETS["sd-1"], overrides={"text_heads": 4})
    same(other.unet.state_dict(), model.unet.state_dict())
    same(other.vae.state_dict(), model.vae.state_dict())
    same(other.text_encoder.model.state_dict(), model.text_encoder.model.state_dict())


def test_nemo_archive(tmp_path):
    model = build_model(None, PRESETS["tiny-v"], seed=2)
    SingleFile().save(model, str(tmp_path / "m.safetensors"))
    sd = {"model." + k: v for k, v in load_file(tmp_path / "m.safetensors").items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    with tarfile.open(tmp_path / "m.nemo", "w") as tar:
        for name, data in (("model_weights.ckpt", buf.getvalue()), ("model_config.yaml", b"parameterization: v\n")):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert isinstance(detect_format(str(tmp_path / "m.nemo")), NemoArchive)
    loaded = build_model(load_checkpoint(str(tmp_path / "m.nemo")), PRESETS["tiny"], explicit=True)
    assert loaded.prediction == "v"
    same(loaded.unet.state_dict(), model.unet.state_dict())


def test_truncated_safetensors_names_file(tmp_path):
    model = build_model(None, PRESETS["tiny"])
    SingleFile().save(model, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        load_checkpoint(str(tmp_path / "t.safetensors"), format="single-file")


def test_missing_unet_key_is_named(tmp_path):
    model = build_model(None, PRESETS["tiny"])
    SingleFile().save(model, str(tmp_path / "m.safetensors"))
    sd = load_file(tmp_path / "m.safetensors")
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="conv_out.weight"):
        build_model(load_checkpoint(str(tmp_path / "bad.safetensors")), PRESETS["tiny"])


def test_unknown_format(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="matches no Stable Diffusion checkpoint format"):
        detect_format(str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(str(tmp_path / "x.safetensors"), format="pickle")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_needing_code_is_refused(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "e.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(str(tmp_path / "e.ckpt"), format="single-file")


def test_wrong_prompt_type():
    model = build_model(None, PRESETS["tiny"])
    with pytest.raises(TypeError, match="list of str"):
        model.text_encoder.encode("a red square")
    with pytest.raises(TypeError, match="list of str"):
        model.text_encoder.encode(["ok", 3])


def test_sd2_text_tower_from_diffusers_survives_single_file(sd2v_folder, tmp_path):
    """diffusers stores SD 2's text tower without its unused last layer and reads the last stored
    one; a single file is read from its penultimate layer, so export pads an identity layer."""
    pipe, folder = sd2v_folder
    model = build_model(load_checkpoint(str(folder)), PRESETS["sd-2"])
    assert model.arch.text.skip_last_layers == 0
    SingleFile().save(model, str(tmp_path / "sd2.safetensors"))
    again = build_model(load_checkpoint(str(tmp_path / "sd2.safetensors")), PRESETS["sd-2"],
                        overrides={"text_heads": model.arch.text.heads})  # a single file does not say
    assert again.arch.text.layers == model.arch.text.layers + 1 and again.arch.text.skip_last_layers == 1
    prompts = ["a red square", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids).last_hidden_state  # what diffusers conditions on
        got = again.text_encoder.encode(prompts).tokens
    assert (got - ref).abs().max() <= 1e-5
