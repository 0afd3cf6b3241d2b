"""The SD -> InstructPix2Pix init: with any source latent, the grown 8-channel UNet predicts what
the SD UNet predicts from the noisy latent alone (the new channels are zero, the bias kept), and
the grown model loads as an edit model."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.interfaces import Conditioning
from t2i_plugin_instructpix2pix.edit import check_edit_model
from t2i_plugin_instructpix2pix.init import grow_to_edit_model
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS


def test_grown_unet_ignores_the_source(sd1_folder):
    _, folder = sd1_folder
    sd = build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])
    edit = grow_to_edit_model(sd)
    check_edit_model(edit)
    g = torch.Generator().manual_seed(0)
    x, src = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 3
    t = torch.tensor([10, 500])
    cond = Conditioning(text=sd.text_encoder.encode(["a", "b"]))
    with torch.no_grad():
        ref = sd.denoiser(x, t, cond)
        got = edit.denoiser(x, t, Conditioning(text=cond.text, extras={"concat": src}))
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(edit.denoiser.conv_in.bias, sd.denoiser.conv_in.bias)
    assert not edit.denoiser.conv_in.weight[:, 4:].any()


def test_only_four_channels_grow(ip2p_folder):
    with pytest.raises(ValueError, match="has 8"):
        grow_to_edit_model(build_model(DiffusersFolder().load(str(ip2p_folder)), PRESETS["sd-1"]))


def test_same_init_as_diffusers_training_script(sd1_folder):
    """diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py grows the UNet it loaded with
    from_pretrained: a new Conv2d(8, ...), weight zeroed, [:, :4] copied from the old conv. Every
    tensor of our grown UNet equals that UNet's, except conv_in.bias: the script leaves the new
    Conv2d's fresh random bias, the reference (ddpm_edit.py init_from_ckpt, which only rewrites
    input_blocks.0.0.weight) keeps the SD bias, and so do we."""
    from diffusers import UNet2DConditionModel

    _, folder = sd1_folder
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    old_bias = unet.conv_in.bias.detach().clone()
    unet.register_to_config(in_channels=8)
    with torch.no_grad():  # the script's lines
        new_conv_in = torch.nn.Conv2d(8, unet.conv_in.out_channels, unet.conv_in.kernel_size, unet.conv_in.stride,
                                      unet.conv_in.padding)
        new_conv_in.weight.zero_()
        new_conv_in.weight[:, :4, :, :].copy_(unet.conv_in.weight)
        unet.conv_in = new_conv_in
    theirs = unet.state_dict()
    ours = grow_to_edit_model(build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])).denoiser.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if key != "conv_in.bias":
            assert torch.equal(value, theirs[key]), key
    assert torch.equal(ours["conv_in.bias"], old_bias)
