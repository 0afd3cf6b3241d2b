"""Exports read back by diffusers' own loaders as the model they came from."""

from __future__ import annotations

import torch

from t2i_plugin_controlnet.export import save_controlnet
from t2i_plugin_controlnet.formats import load_controlnet

from .conftest import tiny_controlnet


def _residuals(net):
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    context, hint = torch.randn(1, 77, 32, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return [*down, mid]


def test_diffusers_and_v11_exports_load_in_diffusers(sd_controlnets, tmp_path):
    """With SD's hint encoder (diffusers' single-file converter knows only that one)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    sd, _ = sd_controlnets
    reference = tiny_controlnet(UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet"), seed=4,
                                conditioning_embedding_out_channels=(16, 32, 96, 256),
                                controlnet_conditioning_channel_order="bgr")
    reference.save_pretrained(tmp_path / "source")
    expected = _residuals(reference)
    loaded = load_controlnet(str(tmp_path / "source"))
    save_controlnet(loaded, str(tmp_path / "folder"))
    from_folder = ControlNetModel.from_pretrained(str(tmp_path / "folder")).eval()
    assert from_folder.config.controlnet_conditioning_channel_order == "bgr"
    save_controlnet(loaded, str(tmp_path / "control_v11p_tiny.safetensors"), format="v1.1")
    from_file = ControlNetModel.from_single_file(str(tmp_path / "control_v11p_tiny.safetensors"),
                                                 config=str(tmp_path / "folder")).eval()
    for theirs in (from_folder, from_file):
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(_residuals(theirs), expected, strict=True))
    assert load_controlnet(str(tmp_path / "folder")).net.config == loaded.net.config
