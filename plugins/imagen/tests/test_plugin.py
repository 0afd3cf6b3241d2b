"""The plugin through the core: ``[model] type = "imagen"`` built by the config loader and
sampled by the core's ``sample`` task; every [model] key has an effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_engine.errors import ConfigError


def _sample(tmp_path, folder, name: str, model_extra: str = "", tail: str = "") -> torch.Tensor:
    from PIL import Image

    import t2i_plugin_imagen.plugin as plugin
    from t2i_engine.config.loader import load_config
    from t2i_engine.plugins.manager import EnginePluginManager
    from t2i_engine.runner import run_config

    toml = tmp_path / f"{name}.toml"
    toml.write_text(f"""
[engine]
plugins = ["imagen"]
output_dir = "{name}"
[task]
name = "sample"
prompts = ["a red circle"]
width = 16
height = 16
[model]
type = "imagen"
checkpoint = "{folder}"
{model_extra}
[sampler]
name = "ddim"
steps = 3
{tail}
""")
    pm = EnginePluginManager().load(autoload=False)
    pm.register(plugin, name="imagen", distribution="t2i-plugin-imagen")
    summary = run_config(load_config(toml, pm), pm)
    return torch.from_numpy(np.array(Image.open(summary["images"][0]))).float()


def test_sample_task_drives_stage1_and_keys_have_effect(tmp_path, if_folders):
    base = _sample(tmp_path, if_folders[1], "base")
    assert base.shape == (16, 16, 3)
    assert (base - _sample(tmp_path, if_folders[1], "same", "token_length = 77")).abs().max() == 0
    assert (base - _sample(tmp_path, if_folders[1], "short", "token_length = 8")).abs().max() > 0
    assert (base - _sample(tmp_path, if_folders[1], "zero", "zero_padding = true")).abs().max() > 0


def test_if_thresholding_through_the_guidance_table(tmp_path, if_folders):
    """IF's thresholding (p 0.95, s in [1, 1.5]) from the job file: the cap changes the image."""
    free = _sample(tmp_path, if_folders[1], "free", tail="[guidance]\nguidance_scale = 7.0\ndynamic_threshold = 0.95")
    capped = _sample(tmp_path, if_folders[1], "capped",
                     tail="[guidance]\nguidance_scale = 7.0\ndynamic_threshold = 0.95\ndynamic_threshold_max = 1.5")
    assert (free - capped).abs().max() > 0


def test_bad_keys(tmp_path, if_folders):
    with pytest.raises(ConfigError, match="token_length"):
        _sample(tmp_path, if_folders[1], "bad", "token_length = 0")
    with pytest.raises(ConfigError, match="checkpoint"):
        _sample(tmp_path, tmp_path / "missing", "missing")
    with pytest.raises(ConfigError, match="stage II"):
        _sample(tmp_path, if_folders[2], "sr")


def test_stage_is_a_model_bundle(if_folders):
    from t2i_engine.interfaces import LatentDiffusionModel, missing_members
    from t2i_plugin_imagen.model import load_if_stage

    stage = load_if_stage(if_folders[1])
    assert missing_members(stage, LatentDiffusionModel) == []
    with pytest.raises(ConfigError, match="not supported yet"):
        stage.trainable(caption_dropout=0.1, train_text_encoder=False)


def test_identity_autoencoder():
    from t2i_plugin_imagen.autoencoder import IdentityAutoencoder

    from t2i_engine.interfaces import Autoencoder, missing_members

    ae = IdentityAutoencoder()
    assert missing_members(ae, Autoencoder) == [] and ae.downsample_factor == 1
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.decode(ae.encode(x)), x)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        ae.encode(torch.zeros(2, 4, 8, 8))


def test_conforms_to_the_sdk_kit():
    import t2i_plugin_imagen.plugin as plugin
    from t2i_sdk.testing import check_plugin

    assert check_plugin(plugin, name="imagen") == {"model": ["imagen", "imagen-stage"],
                                                   "task": ["imagen-cascade", "imagen-shapes-eval"]}


def test_precache_writes_t5_embeddings_and_masks(tmp_path, if_folders):
    """The core's precache task over the shapes data: images unchanged (identity autoencoder),
    T5 tokens and masks equal to a fresh encode of the captions."""
    import t2i_plugin_imagen.plugin as plugin
    from t2i_engine.config.loader import load_config
    from t2i_engine.data.precache import PrecachedConfig, PrecachedDataset
    from t2i_engine.plugins.manager import EnginePluginManager
    from t2i_engine.runner import run_config
    from t2i_plugin_imagen.model import load_if_stage

    toml = tmp_path / "precache.toml"
    toml.write_text(f"""
[engine]
plugins = ["imagen"]
output_dir = "out"
[task]
name = "precache"
batch_size = 3
[model]
type = "imagen"
checkpoint = "{if_folders[1]}"
token_length = 12
zero_padding = true
[data]
type = "shapes"
size = 16
count = 4
""")
    pm = EnginePluginManager().load(autoload=False)
    pm.register(plugin, name="imagen", distribution="t2i-plugin-imagen")
    summary = run_config(load_config(toml, pm), pm)
    assert summary["count"] == 4
    data = PrecachedDataset(PrecachedConfig(url=summary["precached"]))
    enc = load_if_stage(if_folders[1], max_length=12).text_encoder
    enc.zero_padding = True
    for i in range(4):
        sample = data[i]
        assert sample["latents"].shape == (3, 16, 16)
        with torch.no_grad():
            want = enc.encode([sample["caption"]])
        torch.testing.assert_close(sample["text_tokens"], want.tokens[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(sample["text_mask"].bool(), want.mask[0])
