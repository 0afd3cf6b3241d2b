"""Component parity: our UNet, autoencoder and text encoders against diffusers, transformers and
open_clip fed the same tiny random weights (float32, relative error <= 1e-5)."""

from __future__ import annotations

import torch

from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def load(folder):
    return build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])


def test_unet_matches_diffusers(sd1_folder, sd2v_folder):
    for pipe, folder in (sd1_folder, sd2v_folder):
        ours = load(folder)
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 77, 32)
        with torch.no_grad():
            ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
            got = ours.unet(x, t, Conditioning(text=TextEmbedding(ctx)))
        assert rel(got, ref) <= 1e-5


def test_unet_odd_latent_size(sd1_folder):
    pipe, folder = sd1_folder
    ours = load(folder)
    x, t, ctx = torch.randn(1, 4, 7, 9), torch.tensor([10.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        got = ours.unet(x, t, Conditioning(text=TextEmbedding(ctx)))
    assert rel(got, ref) <= 1e-5


def test_vae_matches_diffusers(sd1_folder):
    pipe, folder = sd1_folder
    ours = load(folder)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = pipe.vae.encode(img).latent_dist
        assert rel(ours.vae.encode(img), post.mean * pipe.vae.config.scaling_factor) <= 1e-5
        z = torch.randn(2, 4, 8, 8)
        ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
        assert rel(ours.vae.decode(z), ref) <= 1e-5
    assert ours.vae.scaling_factor == pipe.vae.config.scaling_factor


def test_text_encoder_matches_transformers(sd1_folder, sd2v_folder):
    prompts = ["a red square", "", "a very long prompt " * 30]
    for pipe, folder in (sd1_folder, sd2v_folder):
        ours = load(folder)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ours.text_encoder.tokenize(prompts), ids)
        with torch.no_grad():
            ref = pipe.text_encoder(ids)[0]
            got = ours.text_encoder.encode(prompts).tokens
        assert rel(got, ref) <= 1e-5


def test_open_clip_tower_penultimate_layer():
    """SD 2 layout: our tower with one more layer, read at the penultimate layer, equals an
    open_clip TextTransformer (same weights, without that layer) reading its last layer."""
    import attrs
    from open_clip.transformer import TextTransformer

    from t2i_plugin_sd.text_encoder import CLIPTextEncoder

    torch.manual_seed(1)
    ref = TextTransformer(width=32, heads=4, layers=2, output_dim=None, output_tokens=True).eval()
    ours = CLIPTextEncoder(attrs.evolve(PRESETS["tiny-2"].text, layers=3)).eval()
    state = ours.model.state_dict()
    state.update(ref.state_dict())  # layers 0-1 and embeddings from open_clip, layer 2 stays random
    ours.model.load_state_dict(state)
    ids = ours.tokenize(["a blue circle", "x"])
    with torch.no_grad():
        _, tokens = ref(ids)
        assert rel(ours(ids), tokens) <= 1e-5
