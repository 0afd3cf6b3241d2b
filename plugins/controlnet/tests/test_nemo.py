"""NeMo ``.nemo`` ControlNet archives: a diffusers ControlNetModel written in NeMo's layout (the
original cldm keys with NeMo's block renames, under the ControlLDM's ``model.`` wrapper) with its
``model_config.yaml`` reads back with diffusers' residuals; the yaml is checked and read."""

from __future__ import annotations

import io
import re
import tarfile

import pytest
import torch
import yaml

from t2i_engine.errors import CheckpointError
from t2i_plugin_controlnet.formats import load_controlnet

from .conftest import reference_in_ldm_layout

# CompVis name -> NeMo name (NeMo's UNet blocks: GroupNorm fused with SiLU, LayerNorms inside the
# attention and feed-forward modules), as NeMo's openaimodel.py and attention.py name them
TO_NEMO = [(r"\.in_layers\.2\.", ".in_layers.1."), (r"\.out_layers\.3\.", ".out_layers.2."),
           (r"\.norm1\.", ".attn1.norm."), (r"\.norm2\.", ".attn2.norm."), (r"\.norm3\.(weight|bias)$", r".ff.net.0.\1"),
           (r"\.ff\.net\.2\.", ".ff.net.3."), (r"\.ff\.net\.0\.proj\.", ".ff.net.1.proj.")]

CONTROL_CFG = {"_target_": "nemo.collections.multimodal.models.text_to_image.controlnet.controlnet.ControlNet",
               "image_size": 32, "in_channels": 4, "hint_channels": 3, "model_channels": 32,
               "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
               "use_spatial_transformer": True, "use_linear_in_transformer": False, "transformer_depth": 1,
               "context_dim": 32, "legacy": False, "use_flash_attention": False}


def _to_nemo(key: str) -> str:
    for pattern, repl in TO_NEMO:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


@pytest.fixture(scope="module")
def setup(sd_controlnets, tmp_path_factory):
    sd, _ = sd_controlnets
    root = tmp_path_factory.mktemp("nemo")
    unet, reference, ldm = reference_in_ldm_layout(sd, root, seed=4)  # control_model.* in CompVis names
    state = {"model." + _to_nemo(k): v for k, v in ldm.items()}
    state["model.model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)  # the archive's SD (a token of it)
    return unet, reference, root, state


def _archive(path, state, cfg):
    with tarfile.open(path, "w") as tar:
        for name, data in (("model_config.yaml", yaml.safe_dump(cfg).encode()), ("model_weights.ckpt", _pickle(state))):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pickle(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _residuals(net, *, ours: bool):
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 40.0])
    context, hint = torch.randn(2, 77, 32, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        if ours:
            down, mid = net(x, t, context, hint)
        else:
            down, mid = net(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return [*down, mid]


def test_a_nemo_controlnet_reads_as_diffusers_model(setup, tmp_path):
    unet, reference, _, state = setup
    path = _archive(tmp_path / "controlnet.nemo", state, {"control_stage_config": CONTROL_CFG, "only_mid_control": True,
                                                         "sd_locked": True, "control_key": "hint"})
    loaded = load_controlnet(str(path), base=unet)
    ours, ref = _residuals(loaded.net, ours=True), _residuals(reference, ours=False)
    assert len(ours) == len(ref) and all((a - b).abs().max() <= 1e-5 for a, b in zip(ours, ref))
    assert loaded.only_mid_control


def test_the_yaml_is_checked_against_the_base_model(setup, tmp_path):
    unet, _, _, state = setup
    bad = {"control_stage_config": {**CONTROL_CFG, "num_heads": 4}}
    with pytest.raises(CheckpointError, match="num_heads give heads"):
        load_controlnet(str(_archive(tmp_path / "a.nemo", state, bad)), base=unet)
    with pytest.raises(CheckpointError, match="use_scale_shift_norm"):
        load_controlnet(str(_archive(tmp_path / "b.nemo", state, {"control_stage_config": {
            **CONTROL_CFG, "use_scale_shift_norm": True}})), base=unet)
    with pytest.raises(CheckpointError, match="no control_stage_config"):
        load_controlnet(str(_archive(tmp_path / "c.nemo", state, {})), base=unet)
    sd_only = {k: v for k, v in state.items() if not k.startswith("model.control_model.")}
    with pytest.raises(CheckpointError, match="not of a ControlNet"):
        load_controlnet(str(_archive(tmp_path / "d.nemo", sd_only, {"control_stage_config": CONTROL_CFG})), base=unet)


def test_the_archives_only_mid_control_applies_unless_the_entry_says(setup, tmp_path):
    import types

    from t2i_engine.interfaces import Conditioning, TextEmbedding
    from t2i_plugin_controlnet.conditioner import ControlNetConditioner, ControlNetConditionerConfig

    unet, _, _, state = setup
    path = _archive(tmp_path / "m.nemo", state, {"control_stage_config": CONTROL_CFG, "only_mid_control": True})
    model = types.SimpleNamespace(denoiser=unet, autoencoder=types.SimpleNamespace(downsample_factor=8))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    for key, mid_only in ((None, True), (False, False)):
        cond = ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(path), only_mid_control=key))
        cond.setup(model)
        c = Conditioning(text=TextEmbedding(torch.randn(1, 77, 32), None, None)).with_extras(
            **{cond.key: torch.rand(1, 3, 64, 64)})
        res = cond.residuals(x, t, c)
        assert (res.down is None) == mid_only and res.mid is not None
