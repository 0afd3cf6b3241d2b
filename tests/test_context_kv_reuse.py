"""reuse_context_kv(): inside a sampling loop a cross-attention layer projects the (unchanging) text
context once. The independent truth is the same computation without the cache: identical images,
and the layer's key projection counted."""

from __future__ import annotations

import contextlib

import torch

from t2i_engine.nn import attention
from t2i_engine.nn.attention import Attention, reuse_context_kv


def _count_key_projections(module: torch.nn.Module) -> dict[str, int]:
    """Calls of each attention layer's key projection: ``attn2`` layers (and a lone layer) count as
    cross-attention."""
    counts = {"self": 0, "cross": 0}
    for name, layer in module.named_modules():
        if isinstance(layer, Attention):
            kind = "self" if name.endswith("attn1") else "cross"
            layer.to_k.register_forward_hook(lambda *_, kind=kind: counts.__setitem__(kind, counts[kind] + 1))
    return counts


def test_generate_projects_the_context_once_and_gives_the_same_images(monkeypatch):
    """generate() and every plugin loop share pipeline.denoise(), which holds the block."""
    import t2i_engine.pipeline as pipeline
    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.diffusion.registry import SAMPLERS, SamplerConfig
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    model = build_model(None, PRESETS["tiny"], seed=0).eval()
    counts = _count_key_projections(model.denoiser)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = 5

    def run() -> torch.Tensor:
        counts.update(self=0, cross=0)
        with torch.inference_mode():
            return pipeline.generate(model, ["a red square"], noise, sampler=SAMPLERS["euler"](SamplerConfig(steps=steps)),
                                     guidance=GuidanceConfig(guidance_scale=7.5))

    cached = run()
    cached_counts = dict(counts)
    monkeypatch.setattr(pipeline, "reuse_context_kv", contextlib.nullcontext)
    plain = run()
    layers = plain_cross = counts["cross"] // steps
    assert layers > 0 and plain_cross * steps == counts["cross"]
    assert cached_counts == {"self": counts["self"], "cross": layers}  # once per layer, not per step
    assert torch.equal(cached, plain)


def test_the_cache_keys_on_the_tensor_autocast_and_gradients():
    torch.manual_seed(0)
    layer = Attention(8, context_dim=6, heads=2, head_dim=4).eval()
    counts = _count_key_projections(layer)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    with torch.no_grad():
        want = layer(x, ctx)
        assert counts["cross"] == 1  # outside the block: no cache
        with reuse_context_kv():
            torch.testing.assert_close(layer(x, ctx), want, rtol=0, atol=0)
            layer(x, ctx)
            assert counts["cross"] == 2  # the second call reused the first's keys and values
            layer(x, ctx.clone())  # another tensor, equal values: projected again
            assert counts["cross"] == 3
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer(x, ctx).dtype == torch.bfloat16  # another autocast state: projected again
            assert counts["cross"] == 4
        assert attention._CONTEXT_KV.get() is None  # dropped at the end of the block
    with reuse_context_kv():
        layer(x, ctx.requires_grad_())
        layer(x, ctx)
    assert counts["cross"] == 6  # a gradient needed: never cached
