"""IF UNet: diffusers' UNet2DConditionModel with IF configs, saved by diffusers, is the truth."""

from __future__ import annotations

import json

import pytest
import torch

from t2i_engine.errors import CheckpointError
from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_plugin_imagen.if_folder import load_if_unet


@pytest.mark.parametrize("stage", [1, 2])
def test_forward_matches_diffusers(stage, tmp_path, make_if_unet):
    ref = make_if_unet(stage=stage)
    ref.save_pretrained(tmp_path / "unet")
    ours = load_if_unet(tmp_path / "unet")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    tokens = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([999.0, 17.0])
    extras, kw = {}, {}
    if stage == 2:
        lowres = torch.randn(2, 3, 16, 16, generator=g)
        level = torch.tensor([250, 100])
        extras, kw = {"lowres": lowres, "noise_level": level}, {"class_labels": level}
        x_ref = torch.cat([x, lowres], dim=1)
    else:
        x_ref = x
    with torch.no_grad():
        want = ref(x_ref, t, encoder_hidden_states=tokens, **kw).sample
        got = ours(x, t, Conditioning(text=TextEmbedding(tokens), extras=extras))
    assert got.shape == (2, 6, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_fp16_variant_loads_as_float32_without_random_init(tmp_path, make_if_unet, monkeypatch):
    """diffusers' ``variant="fp16"`` save (``diffusion_pytorch_model.fp16.safetensors``) loads as
    a float32 network equal to the reference cast to half and back; the network is built on the
    meta device (no random float32 weights beside the file's)."""
    from t2i_plugin_imagen import if_folder

    ref = make_if_unet(stage=1)
    ref.half().save_pretrained(tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    built_on: list[str] = []
    original = if_folder.IFUNet.__init__

    def init(self, *a, **kw):
        built_on.append(torch.empty(()).device.type)
        original(self, *a, **kw)

    monkeypatch.setattr(if_folder.IFUNet, "__init__", init)
    ours = load_if_unet(tmp_path / "unet")
    assert built_on == ["meta"]
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    ref = ref.float()
    g = torch.Generator().manual_seed(1)
    x, tokens, t = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=tokens).sample
        got = ours(x, t, Conditioning(text=TextEmbedding(tokens)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("key", "value"), [("act_fn", "silu"), ("resnet_time_scale_shift", "default"),
                                             ("class_embeddings_concat", True), ("upcast_attention", True),
                                             ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("some_new_key", 1)])
def test_unsupported_config_is_refused_by_name(key, value, tmp_path, make_if_unet):
    make_if_unet(stage=1).save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=key):
        load_if_unet(tmp_path / "unet")


def test_stage2_needs_noise_level(tmp_path, make_if_unet):
    make_if_unet(stage=2).save_pretrained(tmp_path / "unet")
    net = load_if_unet(tmp_path / "unet")
    x = torch.randn(1, 3, 8, 8)
    cond = Conditioning(text=TextEmbedding(torch.randn(1, 4, 32)), extras={"lowres": x})
    with pytest.raises(ValueError, match="noise_level"):
        net(x, torch.tensor([1.0]), cond)
