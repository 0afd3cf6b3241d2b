"""``controlnet-convert`` jobs: a diffusers folder written as a v1.1 file and back is the same
model for diffusers' own ``from_pretrained``; the keys take effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_plugin_controlnet import plugin


def _run(tmp_path: Path, task: str, model: str = "") -> dict:
    import t2i_plugin_sd.plugin

    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "convert.toml"
    job.write_text(f'[engine]\nplugins = ["sd", "controlnet"]\ndevice = "cpu"\noutput_dir = "{tmp_path / "out"}"\n'
                   f'[task]\nname = "controlnet-convert"\n{task}\n{model}')
    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(plugin, name="controlnet")
    return dict(run_config(load_config(job, pm), pm))


def test_a_folder_to_v11_and_back_is_the_same_model(sd_controlnets, tmp_path):
    from diffusers import ControlNetModel

    sd, (net, _) = sd_controlnets
    model = f'[model]\ntype = "stable-diffusion"\ncheckpoint = "{sd}"\npreset = "sd-1"\n'
    v11 = _run(tmp_path / "a", f'controlnet = "{net}"\noutput = "cn.safetensors"\nformat = "v1.1"\n')["written"]
    assert all(k.startswith("control_model.") and v.dtype == torch.float32 for k, v in load_file(v11).items())
    back = _run(tmp_path / "b", f'controlnet = "{v11}"\noutput = "cn"\n', model)["written"]
    ref, got = ControlNetModel.from_pretrained(str(net)).state_dict(), ControlNetModel.from_pretrained(back).state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    half = _run(tmp_path / "c", f'controlnet = "{net}"\noutput = "cn16"\ndtype = "float16"\n')["written"]
    assert all(v.dtype == torch.float16 for v in load_file(Path(half) / "diffusion_pytorch_model.safetensors").values())
    with pytest.raises(ConfigError, match="give the \\[model\\] it was made for"):
        _run(tmp_path / "d", f'controlnet = "{v11}"\noutput = "x"\n')
