"""The ControlNet network against diffusers' ControlNetModel on the same saved weights: the
residuals at 1e-5, with the config fields and entry keys that change them."""

from __future__ import annotations

import shutil

import pytest
import torch

from t2i_engine.errors import CheckpointError
from t2i_plugin_controlnet.formats import load_controlnet
from t2i_plugin_controlnet.network import guess_mode_scales

from .conftest import edit_config


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 321.0])
    context = torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 16, 16, generator=g)
    return x, t, context, hint


def _reference(folder, **kwargs):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(str(folder)).eval()
    x, t, context, hint = _inputs()
    with torch.no_grad():
        return net(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False, **kwargs)


def _ours(folder):
    loaded = load_controlnet(str(folder))
    x, t, context, hint = _inputs()
    with torch.no_grad():
        return loaded, loaded.net(x, t, context, hint)


def _close(a, b, tol=1e-5):
    return all((p - q).abs().max() <= tol for p, q in zip(a, b, strict=True))


def test_residuals_match_diffusers_controlnet_model(sd_controlnets):
    _, (folder, _) = sd_controlnets
    ref_down, ref_mid = _reference(folder)
    _, (down, mid) = _ours(folder)
    assert len(down) == len(ref_down) == 4  # conv_in, level 0's ResBlock and downsampler, level 1's ResBlock
    assert _close(down, ref_down) and _close([mid], [ref_mid])


@pytest.mark.parametrize("field", ["controlnet_conditioning_channel_order", "global_pool_conditions"])
def test_the_checkpoint_fields_that_change_the_residuals_are_read(sd_controlnets, tmp_path, field):
    _, (source, _) = sd_controlnets
    folder = tmp_path / "cn"
    shutil.copytree(source, folder)
    edit_config(folder, **{field: "bgr" if field.endswith("order") else True})
    loaded = load_controlnet(str(folder))
    assert (loaded.channel_order, loaded.global_pool) == (
        ("bgr", False) if field.endswith("order") else ("rgb", True))


def test_guess_mode_laws():
    assert torch.allclose(guess_mode_scales(13, law="diffusers"), 10 ** (-1 + torch.arange(13, dtype=torch.float64) / 12))
    original = guess_mode_scales(13, law="original")
    assert original[-1] == 1 and abs(float(original[0]) - 0.825 ** 12) < 1e-12


@pytest.mark.parametrize(("field", "value"), [("class_embed_type", "timestep"), ("some_new_field", 1),
                                              ("controlnet_conditioning_channel_order", "rbg"),
                                              ("mid_block_type", None), ("addition_embed_type", "text"),
                                              ("down_block_types", ["CrossAttnDownBlock2D", "SimpleDown"])])
def test_a_config_field_the_engine_cannot_build_is_refused_by_name(sd_controlnets, tmp_path, field, value):
    _, (source, _) = sd_controlnets
    folder = tmp_path / "cn"
    shutil.copytree(source, folder)
    edit_config(folder, **{field: value})
    with pytest.raises(CheckpointError, match=field.split("[")[0]):
        load_controlnet(str(folder))


def test_weights_that_do_not_fit_the_config_are_refused(sd_controlnets, tmp_path):
    _, (source, _) = sd_controlnets
    folder = tmp_path / "cn"
    shutil.copytree(source, folder)
    edit_config(folder, conditioning_embedding_out_channels=[16, 32, 96])
    with pytest.raises(CheckpointError, match="controlnet_cond_embedding"):
        load_controlnet(str(folder))


def test_an_fp16_variant_folder_loads(sd_controlnets, tmp_path):
    """A folder holding only diffusers' fp16 variant (``save_pretrained(variant="fp16")``)."""
    from diffusers import ControlNetModel

    _, (source, _) = sd_controlnets
    ControlNetModel.from_pretrained(str(source), torch_dtype=torch.float16).save_pretrained(tmp_path / "cn", variant="fp16")
    assert [p.name for p in (tmp_path / "cn").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    reference = ControlNetModel.from_pretrained(str(tmp_path / "cn"), variant="fp16").float().eval()
    x, t, context, hint = _inputs()
    with torch.no_grad():
        ref_down, ref_mid = reference(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    _, (down, mid) = _ours(tmp_path / "cn")
    assert _close(down, ref_down) and _close([mid], [ref_mid])
