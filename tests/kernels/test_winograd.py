"""Winograd F(4x4, 3x3) convolutions (kernels/dense/winograd.py) against the direct convolution in
float64, and the conditions that send an inference convolution there."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels.dense import dispatch, winograd
from t2i_engine.kernels.dense.winograd import (MIN_CHANNELS, MIN_TILES, MIN_TRAIN_TILES, winograd_applies,
                                               winograd_conv2d)
from t2i_engine.nn import ops
from t2i_engine.nn.cpu_inference import pack_conv_weights
from tests.helpers import spy_on


def _relative_error(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """Max error against the float64 direct convolution, over the reference's largest value."""
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("seed", range(10))
def test_equals_the_direct_convolution_on_random_shapes(seed: int) -> None:
    """Any batch, channels and H x W (odd sizes: the last tiles are padded and cropped), with and
    without bias, to float32 rounding amplified by the transforms: the direct float32 convolution
    is at about 2e-6 of the largest output on these shapes, the bound is 5x that."""
    r = random.Random(seed)
    n, c, k, h, w = r.randint(1, 3), r.randint(1, 40), r.randint(1, 40), r.randint(1, 23), r.randint(1, 23)
    g = torch.Generator().manual_seed(seed)
    x, wt = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g)
    b = torch.randn(k, generator=g) if r.random() < 0.6 else None
    assert _relative_error(winograd_conv2d(x, wt, b), x, wt, b) < 1e-5


@pytest.mark.parametrize("band_tiles", [7, 45])
def test_bands_split_a_large_input_and_keep_the_result(band_tiles: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past BAND_BYTES the input is transformed in bands (7 tiles: bands of tile rows, image by
    image; 45: two images of 20 tiles together, then the third), and past CHUNK_BYTES the
    output channels are taken in chunks."""
    g = torch.Generator().manual_seed(0)
    x, wt, b = torch.randn(3, 5, 18, 13, generator=g), torch.randn(7, 5, 3, 3, generator=g), torch.randn(7, generator=g)
    assert winograd.winograd_tiles(x) == 3 * 5 * 4
    whole = winograd_conv2d(x, wt, b)
    assert len(winograd._bands(3, 5, 4, 10**6)) == 1
    monkeypatch.setattr(winograd, "BAND_BYTES", band_tiles * 36 * 5 * 4)  # band_tiles tiles of 5 channels
    monkeypatch.setattr(winograd, "BAND_TILES", 1)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 36 * 5 * 3 * 4)  # 3 output channels of 5 inputs at a time
    monkeypatch.setattr(winograd, "CHUNK_CHANNELS", 1)
    bands = []
    real = winograd._band
    monkeypatch.setattr(winograd, "_band", lambda xb, *a: bands.append(xb.shape) or real(xb, *a))
    banded = winograd_conv2d(x, wt, b)
    # 7 tiles: 3 bands of 2, 2, 1 tile rows per image, each read with its neighbours' edge rows
    assert bands == ([(1, 5, 10, 18), (1, 5, 10, 18), (1, 5, 6, 18)] * 3 if band_tiles == 7
                     else [(2, 5, 22, 18), (1, 5, 22, 18)])
    assert _relative_error(banded, x, wt, b) < 1e-5
    assert ((banded - whole).abs().max() / whole.abs().max()).item() < 1e-5  # other GEMM sizes, other rounding


def test_weight_transform_is_g_g_gt() -> None:
    """The stored (36, out, in) weight is G g G^T per kernel (Lavin and Gray's G), in float64."""
    g = torch.tensor(winograd._G, dtype=torch.float64)
    wt = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    got = winograd.winograd_weight(wt.float()).double().view(6, 6, 3, 2).permute(2, 3, 0, 1)
    torch.testing.assert_close(got, g @ wt @ g.T, rtol=1e-6, atol=1e-6)


def test_shapes_it_applies_to() -> None:
    c = MIN_CHANNELS
    w = torch.empty(c, c, 3, 3)
    side = 4 * int((MIN_TILES / 2) ** 0.5 + 1)  # a batch of 2 at this side has >= MIN_TILES tiles
    x = torch.empty(2, c, side, side)
    assert winograd_applies(x, w, 1, 1, 1, 1) and winograd_applies(x, w, (1, 1), (1, 1), (1, 1), 1)
    assert not winograd_applies(torch.empty(1, c, 8, 8), w, 1, 1, 1, 1)  # 4 tiles
    assert not winograd_applies(x, torch.empty(c, c, 1, 1), 1, 0, 1, 1)  # not 3x3
    assert not winograd_applies(x, w, 2, 1, 1, 1)  # stride
    assert not winograd_applies(x, w, 1, 0, 1, 1)  # padding
    assert not winograd_applies(x, w, 1, "same", 1, 1)
    assert not winograd_applies(x, w, 1, 1, 2, 1)  # dilation
    assert not winograd_applies(x, torch.empty(c, c // 2, 3, 3), 1, 1, 1, 2)  # groups
    assert not winograd_applies(x, torch.empty(c - 1, c, 3, 3), 1, 1, 1, 1)  # too few output channels
    assert not winograd_applies(torch.empty(2, c - 1, side, side), torch.empty(c, c - 1, 3, 3), 1, 1, 1, 1)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    return spy_on(monkeypatch, dispatch, "winograd_conv2d")


def test_dispatch_takes_winograd_for_large_float32_inference_convolutions(spy: list[tuple]) -> None:
    conv = ops.Conv2d(MIN_CHANNELS, MIN_CHANNELS + 8, 3, padding=1)
    x = torch.randn(1, MIN_CHANNELS, 32, 36)  # 8 x 9 = 72 tiles: inference's threshold, not training's
    assert MIN_TILES <= 72 < MIN_TRAIN_TILES
    with torch.inference_mode():
        y = conv(x)
    assert len(spy) == 1
    assert _relative_error(y, x, conv.weight.detach(), conv.bias.detach()) < 1e-5
    with torch.inference_mode():
        conv(x[:, :, :8, :8])  # 4 tiles: the direct convolution
    conv(x.requires_grad_())  # training, too few tiles: the direct convolution
    assert len(spy) == 1


@pytest.mark.parametrize("seed", range(4))
def test_training_gradients_equal_the_direct_convolutions(seed: int, spy: list[tuple]) -> None:
    """From MIN_TRAIN_TILES tiles a training convolution takes Winograd; autograd's input, weight
    and bias gradients equal the float64 direct convolution's."""
    r = random.Random(seed)
    n, c, k = r.randint(1, 3), r.randint(MIN_CHANNELS, MIN_CHANNELS + 20), r.randint(MIN_CHANNELS, MIN_CHANNELS + 20)
    side = r.choice([46, 48, 50]) if n == 1 else r.choice([34, 36, 37])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side - 2, generator=g, requires_grad=True)
    w = (torch.randn(k, c, 3, 3, generator=g) / 24).requires_grad_()
    b = torch.randn(k, generator=g, requires_grad=True)
    assert winograd.winograd_tiles(x) >= MIN_TRAIN_TILES
    y = dispatch.conv2d(x, w, b, 1, 1)
    assert len(spy) == 1
    up = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, (x, w, b), up)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(F.conv2d(x64, w64, b64, padding=1), (x64, w64, b64), up.double())
    for a, e in zip(got, want, strict=True):
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < 2e-5


def test_a_packed_weight_takes_winograd_too(spy: list[tuple]) -> None:
    """A layer whose weight was packed (inference tasks pack deep layers) runs Winograd on a
    plain copy of it where the shape gains, and oneDNN's packed convolution where it does not."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(ops.Conv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1))
    plain = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert pack_conv_weights(model, min_in_channels=1) == (1 if dispatch.onednn_available() else 0)
    x = torch.randn(2, MIN_CHANNELS, 32, 32)
    with torch.inference_mode():
        y = model(x)
        small = model(x[:, :, :8, :8])
    assert len(spy) == 1
    assert _relative_error(y, x, *plain) < 1e-5
    assert _relative_error(small, x[:, :, :8, :8], *plain) < 1e-5


@pytest.mark.parametrize("why", ["path off", "training path off", "T2I_KERNELS=torch", "bf16 autocast",
                                 "bf16 tensors"])
def test_dispatch_keeps_the_direct_convolution_when_the_path_does_not_apply(
        why: str, spy: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, MIN_CHANNELS, 48, 48)  # 288 tiles: enough for either path
    w = torch.randn(MIN_CHANNELS, MIN_CHANNELS, 3, 3) / 24
    if why == "path off":
        monkeypatch.setattr(cpu_paths, "enabled", lambda path: path != "conv_winograd_fp32")
    if why == "training path off":
        monkeypatch.setattr(cpu_paths, "enabled", lambda path: path != "conv_winograd_train_fp32")
        w.requires_grad_()
        assert dispatch.winograd_unsupported_reason(x) is None  # inference stays on
    if why == "T2I_KERNELS=torch":
        monkeypatch.setenv("T2I_KERNELS", "torch")
    if why == "bf16 tensors":
        x, w = x.bfloat16(), w.bfloat16()
    with torch.autocast("cpu", torch.bfloat16, enabled=why == "bf16 autocast"):
        reason = dispatch.winograd_unsupported_reason(x, w)
        y = dispatch.conv2d(x, w, None, 1, 1)
    assert reason is not None and spy == []
    assert y.shape == x.shape
