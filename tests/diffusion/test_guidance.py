"""Guidance wrappers against their definitions and diffusers' helpers."""

from __future__ import annotations

import attrs
import pytest
import torch

from t2i_engine.diffusion.guidance import (
    CFGDenoiser, DualCFGDenoiser, DynamicThreshold, GuidanceConfig, StaticClip, guided_denoiser,
)
from t2i_engine.interfaces import Conditioning, TextEmbedding

diffusers = pytest.importorskip("diffusers")
G = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 4, 4, generator=G, dtype=torch.float64) * 3
SIGMA = torch.tensor([2.0, 0.5], dtype=torch.float64)


def cond(value: float, image: float | None = None) -> Conditioning:
    tokens = torch.full((2, 5, 8), value, dtype=torch.float64)
    extras = {} if image is None else {"concat": torch.full((2, 1, 4, 4), image, dtype=torch.float64)}
    return Conditioning(text=TextEmbedding(tokens), extras=extras)


class Inner:
    """A conditional denoiser that records its batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, c):
        self.batches.append(x.shape[0])
        shift = c.text.tokens.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        if "concat" in c.extras:
            shift = shift + 2 * c.extras["concat"]
        return torch.tanh(x) / (1 + sigma.reshape(-1, 1, 1, 1)) + shift * x.abs().sqrt()


def test_cfg_one_batched_forward():
    inner = Inner()
    out = CFGDenoiser(inner, cond(1.0), cond(0.0), scale=7.5)(X, SIGMA)
    assert inner.batches == [4]
    ref = Inner()
    d_u, d_c = ref(X, SIGMA, cond(0.0)), ref(X, SIGMA, cond(1.0))
    torch.testing.assert_close(out, d_u + 7.5 * (d_c - d_u))
    one = Inner()
    torch.testing.assert_close(CFGDenoiser(one, cond(1.0), cond(0.0), scale=1.0)(X, SIGMA), d_c)
    assert one.batches == [2]


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    out = CFGDenoiser(Inner(), cond(1.0), cond(0.0), scale=5.0, rescale=0.7)(X, SIGMA)
    ref = Inner()
    s = SIGMA.reshape(-1, 1, 1, 1)
    e_u, e_c = (X - ref(X, SIGMA, cond(0.0))) / s, (X - ref(X, SIGMA, cond(1.0))) / s
    e = rescale_noise_cfg(e_u + 5.0 * (e_c - e_u), e_c, guidance_rescale=0.7)
    torch.testing.assert_close(out, X - s * e)


def test_dual_guidance_matches_instruct_pix2pix():
    inner = Inner()
    full, image_only, uncond = cond(1.0, 0.5), cond(0.0, 0.5), cond(0.0, 0.0)
    out = DualCFGDenoiser(inner, full, image_only, uncond, text_scale=7.5, image_scale=1.5)(X, SIGMA)
    assert inner.batches == [6]
    ref = Inner()
    text, image, un = (ref(X, SIGMA, c) for c in (full, image_only, uncond))
    # StableDiffusionInstructPix2PixPipeline: uncond + g (text - image) + g_img (image - uncond)
    torch.testing.assert_close(out, un + 7.5 * (text - image) + 1.5 * (image - un))


def test_dynamic_threshold_matches_imagen():
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                  sample_max_value=1e9)

    def model(x, sigma):
        return x * 2

    out = DynamicThreshold(model, percentile=0.9)(X, SIGMA)
    torch.testing.assert_close(out, ref._threshold_sample(X * 2))
    assert float(out.abs().max()) <= 1.0
    torch.testing.assert_close(StaticClip(model)(X, SIGMA), (X * 2).clamp(-1, 1))


def test_dynamic_threshold_max_is_the_ceiling_of_s():
    """``dynamic_threshold_max`` caps s at the value diffusers calls ``sample_max_value``."""
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)

    def model(x, sigma):
        return x * 4  # s well above 1.5

    def inner(x, sigma, c):
        return model(x, sigma)

    config = GuidanceConfig(guidance_scale=1.0, dynamic_threshold=0.9, dynamic_threshold_max=1.5)
    capped = guided_denoiser(inner, config, cond=cond(1.0), uncond=cond(0.0))
    free = guided_denoiser(inner, attrs.evolve(config, dynamic_threshold_max=None), cond=cond(1.0), uncond=cond(0.0))
    torch.testing.assert_close(capped(X, SIGMA), ref._threshold_sample(X * 4))
    assert not torch.allclose(capped(X, SIGMA), free(X, SIGMA))
    with pytest.raises(ValueError):
        GuidanceConfig(dynamic_threshold=0.9, dynamic_threshold_max=0.5)
    with pytest.raises(ValueError, match="needs 'dynamic_threshold'"):
        GuidanceConfig(dynamic_threshold_max=1.5)


def test_guidance_config_validation():
    assert GuidanceConfig(guidance_scale=7).guidance_scale == 7.0
    for bad in ({"guidance_scale": "x"}, {"guidance_scale": True}, {"image_guidance_scale": "1"}):
        with pytest.raises(TypeError):
            GuidanceConfig(**bad)
    for bad in ({"guidance_rescale": 1.5}, {"guidance_scale": -1.0}, {"dynamic_threshold": 0.0}):
        with pytest.raises(ValueError):
            GuidanceConfig(**bad)


def test_guided_denoiser_chain():
    m = guided_denoiser(Inner(), GuidanceConfig(dynamic_threshold=0.99), cond=cond(1.0), uncond=cond(0.0))
    assert isinstance(m, DynamicThreshold) and isinstance(m.model, CFGDenoiser)
    m = guided_denoiser(Inner(), GuidanceConfig(image_guidance_scale=1.5, clip_denoised=True),
                        cond=cond(1.0, 1.0), uncond=cond(0.0, 0.0), image_only=cond(0.0, 1.0))
    assert isinstance(m, StaticClip) and isinstance(m.model, DualCFGDenoiser)
    with pytest.raises(ValueError):
        guided_denoiser(Inner(), GuidanceConfig(image_guidance_scale=1.5), cond=cond(1.0), uncond=cond(0.0))


def test_guidance_interval_guides_only_the_sigmas_inside():
    """Kynkaanniemi et al. 2024: CFG for sigma in (lo, hi], the conditional prediction elsewhere."""
    ref = Inner()
    d_u, d_c = ref(X, SIGMA, cond(0.0)), ref(X, SIGMA, cond(1.0))
    full = d_u + 4.0 * (d_c - d_u)
    inner = Inner()
    out = CFGDenoiser(inner, cond(1.0), cond(0.0), scale=4.0, interval=(1.0, 3.0))(X, SIGMA)  # sigma 2 in, 0.5 out
    torch.testing.assert_close(out[0], full[0])
    torch.testing.assert_close(out[1], d_c[1])
    assert inner.batches == [4]
    none_inside = Inner()
    out = CFGDenoiser(none_inside, cond(1.0), cond(0.0), scale=4.0, interval=(2.0, 3.0))(X, SIGMA)  # (2, 3]: 2 is out
    torch.testing.assert_close(out, d_c)
    assert none_inside.batches == [2]  # no uncond forward at all
    edge = CFGDenoiser(Inner(), cond(1.0), cond(0.0), scale=4.0, interval=(0.25, 2.0))(X, SIGMA)  # hi is inside
    torch.testing.assert_close(edge, full)


def test_guidance_interval_config():
    from t2i_engine.config.structure import structure
    from t2i_engine.errors import ConfigError

    assert GuidanceConfig(guidance_interval=[0, 5]).guidance_interval == (0.0, 5.0)
    for bad, words in (([1.0], "2 values"), ([3.0, 1.0], "lo < hi"), ([-1, 2], "lo < hi"), ("ab", "a list"),
                       ([True, 2], r"interval\[0\]: expected a number")):
        with pytest.raises(ConfigError, match=words):
            structure(GuidanceConfig, {"guidance_interval": bad}, "guidance")
    config = GuidanceConfig(guidance_scale=2.0, image_guidance_scale=1.5, guidance_interval=[0.5, 5.0])
    with pytest.raises(ValueError, match="guidance_interval"):
        guided_denoiser(Inner(), config, cond=cond(1.0), uncond=cond(0.0), image_only=cond(0.5, 1.0))
    model = guided_denoiser(Inner(), GuidanceConfig(guidance_scale=3.0, guidance_interval=[1, 3]), cond=cond(1.0),
                            uncond=cond(0.0))
    assert model.interval == (1.0, 3.0)
