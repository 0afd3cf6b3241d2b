"""lllyasviel's original-layout files: written in the v1.1 layout, read by diffusers' own
``ControlNetModel.from_single_file`` as the same model, and by ours with the same residuals at
1e-5; the v1.0 whole-ControlLDM file, un-prefixed keys, difference files and pickles too."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from t2i_engine.errors import CheckpointError
from t2i_plugin_controlnet.formats import load_controlnet
from t2i_plugin_sd import keymaps

from .conftest import reference_in_ldm_layout


@pytest.fixture(scope="module")
def setup(sd_controlnets, tmp_path_factory):
    """(our UNet, the diffusers ControlNetModel, its folder, its v1.1 file) with SD's hint encoder (f = 8)."""
    sd, _ = sd_controlnets
    root = tmp_path_factory.mktemp("ldm")
    unet, reference, state = reference_in_ldm_layout(sd, root, seed=3)
    save_file(state, root / "control_v11p_sd15_tiny.safetensors")
    return unet, reference, root


def _inputs():
    g = torch.Generator().manual_seed(6)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 40.0]), torch.randn(2, 77, 32, generator=g),
            torch.rand(2, 3, 64, 64, generator=g))


def _residuals(net, *, ours: bool):
    x, t, context, hint = _inputs()
    with torch.no_grad():
        if ours:
            down, mid = net(x, t, context, hint)
        else:
            down, mid = net(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return [*down, mid]


def _close(a, b):
    return len(a) == len(b) and all((p - q).abs().max() <= 1e-5 for p, q in zip(a, b))


def test_diffusers_reads_the_v11_file_as_the_same_model(setup):
    from diffusers import ControlNetModel

    _, reference, root = setup
    theirs = ControlNetModel.from_single_file(str(root / "control_v11p_sd15_tiny.safetensors"),
                                              config=str(root / "folder")).eval()
    assert _close(_residuals(theirs, ours=False), _residuals(reference, ours=False))


def _write_variants(root, unet):
    from safetensors.torch import load_file

    state = load_file(root / "control_v11p_sd15_tiny.safetensors")
    control = {k.removeprefix("control_model."): v for k, v in state.items()}
    base_ldm, _ = keymaps.convert(unet.state_dict(), keymaps.unet_table(unet.config), forward=True)
    whole = {**state, **{f"model.diffusion_model.{k}": v for k, v in base_ldm.items()},
             "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}
    difference = {f"control_model.{k}": v - base_ldm[k] if k in base_ldm else v for k, v in control.items()}
    difference["difference"] = torch.tensor([])
    files = {"v11.safetensors": state, "unprefixed.safetensors": control, "v10_whole.safetensors": whole,
             "difference.safetensors": difference}
    for name, sd in files.items():
        save_file(sd, root / name)
    torch.save(state, root / "control_v11p.pth")
    return [*files, "control_v11p.pth"]


def test_each_original_layout_reads_as_diffusers_model(setup):
    unet, reference, root = setup
    expected = _residuals(reference, ours=False)
    for name in _write_variants(root, unet):
        loaded = load_controlnet(str(root / name), base=unet)
        assert _close(_residuals(loaded.net, ours=True), expected), name


def test_a_file_for_another_base_is_refused(setup, tmp_path):
    unet, _, root = setup
    from safetensors.torch import load_file

    state = load_file(root / "control_v11p_sd15_tiny.safetensors")
    state["control_model.input_blocks.9.0.in_layers.0.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="input_blocks.9.0.in_layers.0.weight"):
        load_controlnet(str(tmp_path / "odd.safetensors"), base=unet)
    save_file({"model.diffusion_model.time_embed.0.weight": torch.zeros(1)}, tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet file"):
        load_controlnet(str(tmp_path / "sd.safetensors"), base=unet)


def test_a_difference_file_reads_the_same_against_a_packed_base(setup):
    """The sample task packs the base UNet's CPU weights (oneDNN layout) before the ControlNet
    conditioner loads; a difference file adds to the base's state_dict, which must still hand out
    plain weights. Loaded against the packed UNet, it gives the diffusers model's residuals."""
    import copy

    from t2i_engine.nn.cpu_inference import pack_conv_weights, pack_linear_weights

    unet, reference, root = setup
    _write_variants(root, unet)
    packed = copy.deepcopy(unet)
    n = pack_conv_weights(packed, min_in_channels=1) + pack_linear_weights(packed)
    if n == 0:
        pytest.skip("this CPU's timing turned packing off")
    assert any(p.is_mkldnn for p in packed.parameters())
    loaded = load_controlnet(str(root / "difference.safetensors"), base=packed)
    assert _close(_residuals(loaded.net, ours=True), _residuals(reference, ours=False))
