"""Tiny diffusers ControlNetModels (random weights, made and saved by diffusers) on the SD
plugin's tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plugins.sd.tests.conftest import tiny_pipeline


def _randomize_zero_convs(controlnet, *, seed: int) -> None:
    """A fresh ControlNet changes nothing (zero convs); random ones make it act."""
    g = torch.Generator().manual_seed(seed)
    zero = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
            *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tiny_controlnet(unet, *, seed: int, **config):
    """``ControlNetModel.from_unet`` (the encoder copied, as users initialise one) with random zero convs;
    the hint encoder has one stride-2 level to fit the tiny autoencoder's factor 2."""
    from diffusers import ControlNetModel

    config.setdefault("conditioning_embedding_out_channels", (16, 32))
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, **config)
    _randomize_zero_convs(controlnet, seed=seed)
    return controlnet.eval()


def edit_config(folder: Path, **changes) -> None:
    """Change fields of a saved ControlNetModel's config.json."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **changes}))


@pytest.fixture(scope="session")
def sd_controlnets(tmp_path_factory):
    """(SD folder, [two ControlNet folders]) saved by diffusers."""
    root = tmp_path_factory.mktemp("controlnet")
    pipe = tiny_pipeline(tokenizer_dir=root / "tok")
    pipe.save_pretrained(root / "sd")
    folders = []
    for i in range(2):
        tiny_controlnet(pipe.unet, seed=10 + i).save_pretrained(root / f"cn{i}")
        folders.append(root / f"cn{i}")
    return root / "sd", folders


def hint_png(path: Path, *, seed: int, size: int = 16) -> Path:
    """A random RGB hint image of ``size`` pixels."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def sd2v_controlnet(tmp_path_factory):
    """(SD 2 layout folder with v-prediction, its ControlNet folder) saved by diffusers."""
    root = tmp_path_factory.mktemp("controlnet-sd2")
    pipe = tiny_pipeline(sd2=True, v=True, tokenizer_dir=root / "tok")
    pipe.save_pretrained(root / "sd")
    tiny_controlnet(pipe.unet, seed=12).save_pretrained(root / "cn")
    return root / "sd", root / "cn"


def reference_in_ldm_layout(sd: Path, root: Path, *, seed: int):
    """``(our SD UNet, a diffusers ControlNetModel with SD's hint encoder (f = 8), its state in the
    original control_model layout)`` for files of the lllyasviel/NeMo kinds; the model is saved by
    diffusers in ``root / "folder"``."""
    from diffusers import UNet2DConditionModel
    from t2i_plugin_controlnet.formats import load_controlnet
    from t2i_plugin_controlnet.ldm import to_ldm
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    reference = tiny_controlnet(UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet"), seed=seed,
                                conditioning_embedding_out_channels=(16, 32, 96, 256))
    reference.save_pretrained(root / "folder")
    unet = build_model(DiffusersFolder().load(str(sd)), PRESETS["sd-1"]).unet
    loaded = load_controlnet(str(root / "folder"))
    return unet, reference, to_ldm(loaded.net.state_dict(), loaded.net.config.unet, widths=4)
