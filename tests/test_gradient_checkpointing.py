"""Gradient checkpointing in the shared UNet blocks and the SD text tower: the same gradients as
the plain path (the recomputation is the same arithmetic), the blocks really run again in the
backward pass, and inference is untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_engine.nn.attention import SpatialTransformer
from t2i_engine.nn.checkpointing import enable_gradient_checkpointing
from t2i_engine.nn.resblock import ResBlock
from t2i_engine.nn.unet import UNet, UNetConfig


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(channels=(16, 32), attention=(True, True), heads=(2, 2), layers_per_block=1,
                           context_dim=8, groups=4))


def _grads(model: torch.nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """Count runs of each block's body (its first norm layer), recomputations included."""
    calls = [0]
    for m in model.modules():
        if isinstance(m, ResBlock | SpatialTransformer):
            norm = m.norm1 if isinstance(m, ResBlock) else m.norm
            norm.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_unet_gradients_equal_the_plain_path() -> None:
    plain = _unet().train()
    checkpointed = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(checkpointed) == sum(
        isinstance(m, ResBlock | SpatialTransformer) for m in checkpointed.modules())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    cond = Conditioning(text=TextEmbedding(torch.randn(2, 5, 8, generator=g), None, None))

    def loss(model):
        return (model(x, t, cond) ** 2).mean()

    calls_plain, calls_ckpt = _count_forwards(plain), _count_forwards(checkpointed)
    expected, got = _grads(plain, loss), _grads(checkpointed, loss)
    assert expected.keys() == got.keys() and len(got) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert calls_ckpt[0] == 2 * calls_plain[0]  # every block ran again in the backward pass

    calls_ckpt[0] = calls_plain[0] = 0
    with torch.no_grad():  # inference: the plain path, the same output
        torch.testing.assert_close(checkpointed(x, t, cond), plain(x, t, cond))
    assert calls_ckpt[0] == calls_plain[0] > 0
    enable_gradient_checkpointing(checkpointed, enabled=False)
    calls_ckpt[0] = calls_plain[0] = 0
    _grads(checkpointed, loss), _grads(plain, loss)
    assert calls_ckpt[0] == calls_plain[0]


def test_sd_text_tower_gradients_equal_the_plain_path() -> None:
    pytest.importorskip("open_clip")
    from t2i_plugin_sd.presets import PRESETS
    from t2i_plugin_sd.text_encoder import CLIPTextEncoder

    torch.manual_seed(0)
    plain = CLIPTextEncoder(PRESETS["tiny"].text).train()
    checkpointed = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(checkpointed) == 1
    ids = plain.tokenize(["a red square", "a blue circle on green"])

    def loss(model):
        return (model(ids) ** 2).mean()

    layers = plain.model.transformer.resblocks
    calls = [0]
    for block in checkpointed.model.transformer.resblocks:
        block.ln_1.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    expected, got = _grads(plain, loss), _grads(checkpointed, loss)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    used = len(layers) - PRESETS["tiny"].text.skip_last_layers
    assert calls[0] == 2 * used


def test_train_switch_reaches_the_blocks(tmp_path) -> None:
    """train.gradient_checkpointing = true on a trainable without its own method flags the shared
    blocks it is built of (and a trainable without any is refused by name)."""
    from t2i_engine.errors import ConfigError
    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.loop import _prepare_model

    holder = torch.nn.Module()
    holder.unet = _unet()
    _prepare_model(holder, TrainConfig(gradient_checkpointing=True))
    assert all(m.gradient_checkpointing for m in holder.modules() if isinstance(m, ResBlock | SpatialTransformer))
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: Linear has no"):
        _prepare_model(torch.nn.Linear(2, 2), TrainConfig(gradient_checkpointing=True))
