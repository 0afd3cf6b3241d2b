"""bf16 inference with the autocast layers' weights cast once (what the sample task does for
``*-mixed`` precisions) gives the same images as plain autocast over float32 weights."""

from __future__ import annotations

import torch

from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.diffusion.registry import SAMPLERS, SamplerConfig
from t2i_engine.nn.precision import cast_autocast_weights
from t2i_engine.pipeline import generate
from t2i_engine.tasks.common import prepare_for_autocast
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS


def _generate(model, noise):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return generate(model, ["a red square"], noise, sampler=SAMPLERS["dpmpp_2m"](SamplerConfig(steps=4)),
                        guidance=GuidanceConfig(guidance_scale=7.5))


def test_cast_once_equals_autocast(sd1_folder):
    _, folder = sd1_folder
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])
    want = _generate(model, noise)
    fp32_before = sum(p.numel() for p in model.unet.parameters())
    assert prepare_for_autocast(model, torch.bfloat16) > 0
    assert model.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in model.unet.modules() if isinstance(m, torch.nn.GroupNorm)
               for p in m.parameters())  # norms stay float32, as autocast runs them
    assert sum(p.numel() for p in model.unet.parameters()) == fp32_before
    got = _generate(model, noise)
    assert torch.equal(got, want)  # the same casts, done once: bit for bit


def test_multihead_attention_is_left_alone():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 2))
    cast_autocast_weights(block, torch.bfloat16)
    assert block[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in block[1].parameters())
