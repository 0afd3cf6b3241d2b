"""Which UNets the edit path takes: diffusers-saved folders load through the SD plugin with the
input width read from the weights; 8 channels are accepted, SD inpainting's 9 and plain SD's 4
are refused by name."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.diffusion.registry import SAMPLERS
from t2i_plugin_instructpix2pix.edit import check_edit_model, edit_images
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .conftest import tiny_ip2p_folder

pytest.importorskip("diffusers")


def _model(folder):
    return build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])


def test_eight_channel_folder_loads(ip2p_folder):
    model = _model(ip2p_folder)
    assert model.denoiser.config.in_channels == 8
    check_edit_model(model)


@pytest.mark.parametrize("channels,words", [(9, "inpainting"), (4, "has 4")])
def test_other_widths_refused(tmp_path, channels, words):
    model = _model(tiny_ip2p_folder(tmp_path, in_channels=channels))
    assert model.denoiser.config.in_channels == channels
    with pytest.raises(ValueError, match=words):
        edit_images(model, ["x"], torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 8, 8),
                    sampler=SAMPLERS["ddim"](SAMPLERS["ddim"].Config(steps=2)))


def test_mismatched_noise_named(ip2p_folder):
    with pytest.raises(ValueError, match="does not fit source images"):
        edit_images(_model(ip2p_folder), ["x"], torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 4, 4),
                    sampler=SAMPLERS["ddim"](SAMPLERS["ddim"].Config(steps=2)))


@pytest.mark.filterwarnings("ignore:.*yaml cannot express")  # the tiny text tower's 4 heads
def test_single_file_round_trip_and_ema_refused(ip2p_folder, tmp_path):
    """An 8-channel single file (the A1111 layout, model.diffusion_model.*) loads through the SD
    plugin with the folder's UNet weights; one that carries model_ema.* keys (timbrooks' .ckpt) is
    refused rather than edited with its non-EMA weights."""
    from t2i_plugin_sd.formats import SingleFile

    model = _model(ip2p_folder)
    SingleFile().save(model, str(tmp_path / "ip2p.safetensors"))
    again = build_model(SingleFile().load(str(tmp_path / "ip2p.safetensors")), PRESETS["sd-1"])
    assert again.denoiser.config.in_channels == 8
    ours, theirs = model.denoiser.state_dict(), again.denoiser.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model.extras["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    SingleFile().save(model, str(tmp_path / "ema.safetensors"))
    with_ema = build_model(SingleFile().load(str(tmp_path / "ema.safetensors")), PRESETS["sd-1"])
    with pytest.raises(ValueError, match="EMA weights.*model_ema.diffusion_modelinput_blocks00weight"):
        check_edit_model(with_ema)
