"""A checkpoint the engine cannot represent is a CheckpointError naming the field, never a
different model: diffusers configs, latent-diffusion yamls, configs that contradict the weights."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from t2i_engine.errors import CheckpointError
from t2i_plugin_sd.formats import SingleFile, load_checkpoint
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore:.*latent-diffusion yaml cannot express")


def _edited_folder(sd1_folder, tmp_path, sub: str, **changes):
    _, folder = sd1_folder
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    path = out / sub / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("sub,field,value", [
    ("unet", "resnet_time_scale_shift", "scale_shift"),
    ("unet", "class_embed_type", "timestep"),
    ("unet", "addition_embed_type", "text_time"),
    ("unet", "center_input_sample", True),
    ("unet", "conv_in_kernel", 7),
    ("unet", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("unet", "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("unet", "only_cross_attention", True),
    ("unet", "some_future_field", 3),
    ("vae", "shift_factor", 0.1159),
    ("vae", "use_quant_conv", False),
    ("vae", "mid_block_add_attention", False),
    ("text_encoder", "hidden_act", "gelu_new"),
])
def test_unsupported_field_is_named(sd1_folder, tmp_path, sub, field, value):
    folder = _edited_folder(sd1_folder, tmp_path, sub, **{field: value})
    with pytest.raises(CheckpointError, match=field):
        build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])


@pytest.mark.parametrize("sub,field,value", [
    ("unet", "block_out_channels", [32, 96]),
    ("unet", "layers_per_block", 2),
    ("unet", "cross_attention_dim", 64),
    ("unet", "use_linear_projection", True),
    ("unet", "transformer_layers_per_block", 2),
    ("vae", "latent_channels", 8),
    ("text_encoder", "intermediate_size", 64),
])
def test_config_contradicting_weights_is_named(sd1_folder, tmp_path, sub, field, value):
    folder = _edited_folder(sd1_folder, tmp_path, sub, **{field: value})
    with pytest.raises(CheckpointError, match=field):
        build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])


def test_groups_that_do_not_divide_are_refused(sd1_folder, tmp_path):
    folder = _edited_folder(sd1_folder, tmp_path, "unet", norm_num_groups=24)
    with pytest.raises(CheckpointError, match="groups"):
        build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])


def test_groups_that_divide_are_honoured(sd1_folder, tmp_path):
    """Before, a count that divided the channels silently loaded with 32 groups."""
    folder = _edited_folder(sd1_folder, tmp_path, "unet", norm_num_groups=16, norm_eps=1e-3)
    model = build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])
    assert model.unet.conv_norm_out.num_groups == 16 and model.unet.conv_norm_out.eps == 1e-3
    assert model.unet.down_blocks[0].resnets[0].norm1.num_groups == 16


def _single_file(tmp_path, yaml_edit=None):
    model = build_model(None, PRESETS["tiny"])
    SingleFile().save(model, str(tmp_path / "m.safetensors"))
    if yaml_edit is not None:
        cfg = yaml.safe_load((tmp_path / "m.yaml").read_text())
        yaml_edit(cfg["model"]["params"])
        (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "m.safetensors")


@pytest.mark.parametrize("field,edit", [
    ("parameterization", lambda p: p.update(parameterization="x0")),
    ("conditioning_key", lambda p: p.update(conditioning_key="hybrid")),
    ("beta_schedule", lambda p: p.update(beta_schedule="sqrt")),
    ("use_scale_shift_norm", lambda p: p["unet_config"]["params"].update(use_scale_shift_norm=True)),
    ("num_classes", lambda p: p["unet_config"]["params"].update(num_classes=10)),
    ("brand_new", lambda p: p["unet_config"]["params"].update(brand_new=1)),
    ("attn_resolutions", lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_resolutions=[16])),
    ("layer", lambda p: p["cond_stage_config"].update(params={"layer": "hidden", "layer_idx": 10})),
    ("target", lambda p: p["cond_stage_config"].update(target="ldm.modules.encoders.modules.FrozenT5Embedder")),
    ("num_res_blocks", lambda p: p["unet_config"]["params"].update(num_res_blocks=3)),
    ("channel_mult", lambda p: p["unet_config"]["params"].update(channel_mult=[1, 4])),
])
def test_ldm_yaml_field_is_named(tmp_path, field, edit):
    path = _single_file(tmp_path, edit)
    with pytest.raises(CheckpointError, match=field):
        build_model(load_checkpoint(path), PRESETS["sd-1"])


def test_broken_yaml_is_a_checkpoint_error(tmp_path):
    path = _single_file(tmp_path)
    (tmp_path / "m.yaml").write_text("model: [unclosed\n  - !!python/object:os.system x\n")
    with pytest.raises(CheckpointError, match="m.yaml"):
        load_checkpoint(path)


def test_heads_that_no_file_records_are_asked_for(tmp_path):
    """A single file without metadata or yaml, of an architecture that is not a released one: the
    load says which key to set instead of guessing (it used to fall back to a rule)."""
    path = _single_file(tmp_path)
    (tmp_path / "m.yaml").unlink()
    save_file(load_file(path), str(tmp_path / "bare.safetensors"))  # no metadata
    with pytest.raises(CheckpointError, match="unet_heads"):
        build_model(load_checkpoint(str(tmp_path / "bare.safetensors")), PRESETS["sd-1"])
    model = build_model(load_checkpoint(str(tmp_path / "bare.safetensors")), PRESETS["sd-1"],
                        overrides={"unet_heads": (2, 2), "text_heads": 4})
    assert model.arch.unet.heads == (2, 2)
