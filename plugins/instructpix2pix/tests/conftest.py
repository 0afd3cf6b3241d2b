"""A tiny random StableDiffusionInstructPix2PixPipeline (8-channel UNet) made and saved by diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plugins.sd.tests.conftest import sd1_folder, tiny_pipeline  # noqa: F401 - sd1_folder: a fixture


def tiny_ip2p_folder(root: Path, *, in_channels: int = 8, seed: int = 1) -> Path:
    """The SD plugin's tiny pipeline with a fresh random UNet of ``in_channels`` inputs, as a
    StableDiffusionInstructPix2PixPipeline saved with save_pretrained."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    sd = tiny_pipeline(tokenizer_dir=root / "tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**sd.unet.config, "in_channels": in_channels}).eval()
    pipe = StableDiffusionInstructPix2PixPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                                  unet=unet, scheduler=sd.scheduler, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def ip2p_folder(tmp_path_factory):
    return tiny_ip2p_folder(tmp_path_factory.mktemp("ip2p"))


def source_png(path: Path, *, seed: int, size: int = 16) -> Path:
    """A random RGB source image of ``size`` pixels."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def _sd(folder: Path):
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    return build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])


@pytest.fixture(scope="session")
def ema_file(ip2p_folder, tmp_path_factory):
    """A timbrooks-style single file, as (file, trained folder, EMA folder): the trained UNet
    (``model.diffusion_model.*``) from ip2p_folder, the flattened ``model_ema.*`` copy from another."""
    from t2i_plugin_instructpix2pix.ema import UNET_PREFIX
    from t2i_plugin_sd.formats import SingleFile, join_single_file

    root = tmp_path_factory.mktemp("ema")
    other = tiny_ip2p_folder(root / "other", seed=5)
    trained = _sd(ip2p_folder)
    ema = join_single_file(_sd(other).weights())
    trained.extras.update({"model_ema." + "".join(k.split(".")[1:]): v for k, v in ema.items()
                           if k.startswith(UNET_PREFIX)})
    trained.extras.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    SingleFile().save(trained, str(root / "ip2p.safetensors"))
    return root / "ip2p.safetensors", ip2p_folder, other
