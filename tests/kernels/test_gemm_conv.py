"""Training convolutions as unfold + GEMM (kernels/dense/gemm_conv.py) against F.conv2d and its
autograd, and the conditions that send a convolution there."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels.dense import dispatch
from t2i_engine.kernels.dense.gemm_conv import (MAX_ROWS, WIDE_CHANNELS, WIDE_MAX_ROWS, gemm_conv2d,
                                                gemm_conv_applies)
from t2i_engine.nn import ops
from tests.helpers import spy_on


def _case(seed: int) -> dict:
    """A random convolution: kernel, stride, padding, dilation, sizes and bias drawn per seed."""
    r = random.Random(seed)
    kh, kw = r.choice([(3, 3), (3, 3), (2, 2), (3, 1), (1, 3), (4, 4)])
    stride, padding, dilation = (r.choice([1, 2]), r.choice([1, 2])), (r.choice([0, 1, 2]), r.choice([0, 1])), \
        (r.choice([1, 2]), 1)
    h, w = r.randint(dilation[0] * (kh - 1) + 1, 9), r.randint(kw, 9)
    return {"x": (r.randint(1, 3), r.randint(1, 12), h, w), "w": (r.randint(1, 16), kh, kw), "stride": stride,
            "padding": padding, "dilation": dilation, "bias": r.random() < 0.6}


def _tensors(case: dict, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*case["x"], generator=g).to(dtype).requires_grad_()
    out, kh, kw = case["w"]
    w = (torch.randn(out, case["x"][1], kh, kw, generator=g) / 3).to(dtype).requires_grad_()
    b = torch.randn(out, generator=g).to(dtype).requires_grad_() if case["bias"] else None
    return x, w, b


def _grads(fn, x, w, b, seed: int) -> list[torch.Tensor]:  # noqa: ANN001 - the conv under test and its inputs
    y = fn(x, w, b)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    inputs = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, inputs, up)]


@pytest.mark.parametrize("seed", range(12))
def test_float32_output_and_gradients_match_conv2d(seed: int) -> None:
    case = _case(seed)
    x, w, b = _tensors(case, torch.float32, seed)
    kw = {k: case[k] for k in ("stride", "padding", "dilation")}
    got = _grads(lambda x, w, b: gemm_conv2d(x, w, b, **kw), x, w, b, seed)
    want = _grads(lambda x, w, b: F.conv2d(x, w, b, **kw), x, w, b, seed)
    assert got[0].shape == want[0].shape and got[0].is_contiguous()
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bf16_and_autocast_match_conv2d() -> None:
    case = {"x": (2, 16, 4, 4), "w": (24, 3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "bias": True}
    for autocast in (False, True):
        dtype = torch.float32 if autocast else torch.bfloat16
        x, w, b = _tensors(case, dtype, 3)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            got = _grads(lambda x, w, b: gemm_conv2d(x, w, b, 1, 1), x, w, b, 3)
            want = _grads(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x, w, b, 3)
        assert got[0].dtype == want[0].dtype == torch.bfloat16
        for a, e in zip(got, want, strict=True):
            assert a.dtype == e.dtype
            torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=3e-2)


def test_shapes_it_applies_to() -> None:
    w3 = torch.empty(8, 4, 3, 3)
    assert gemm_conv_applies(torch.empty(1, 4, 8, 8), w3, 1, 1, 1, 1)  # 64 rows
    assert not gemm_conv_applies(torch.empty(1, 4, 9, 8), w3, 1, 1, 1, 1)  # 72 rows, narrow
    assert gemm_conv_applies(torch.empty(4, 4, 8, 8), w3, 2, 1, 1, 1)  # stride 2: 4 x 4x4 outputs
    wide = torch.empty(WIDE_CHANNELS, 4, 3, 3)
    assert gemm_conv_applies(torch.empty(2, 4, 8, 8), wide, 1, 1, 1, 1)  # 128 rows, wide
    assert not gemm_conv_applies(torch.empty(3, 4, 8, 8), wide, 1, 1, 1, 1)  # 192 rows
    assert MAX_ROWS == 64 and WIDE_MAX_ROWS == 128
    assert not gemm_conv_applies(torch.empty(1, 4, 4, 4), torch.empty(8, 4, 1, 1), 1, 0, 1, 1)  # 1x1
    assert not gemm_conv_applies(torch.empty(1, 4, 4, 4), torch.empty(8, 2, 3, 3), 1, 1, 1, 2)  # groups
    assert not gemm_conv_applies(torch.empty(1, 4, 4, 4), w3, 1, "same", 1, 1)
    assert not gemm_conv_applies(torch.empty(1, 4, 2, 2), w3, 1, 0, 1, 1)  # no output pixel


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    return spy_on(monkeypatch, dispatch, "gemm_conv2d")


def test_dispatch_takes_the_gemm_for_small_training_convolutions(spy: list[tuple]) -> None:
    conv = ops.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    y = conv(x)
    assert len(spy) == 1
    y.sum().backward()
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv(x)  # inference keeps PyTorch's (or the packed) convolution
    conv(torch.randn(2, 6, 16, 16, requires_grad=True))  # 512 rows: PyTorch's
    assert len(spy) == 1


@pytest.mark.parametrize("why", ["path off", "T2I_KERNELS=torch", "fp16 autocast", "mixed dtypes"])
def test_dispatch_keeps_pytorch_when_the_path_does_not_apply(why: str, spy: list[tuple],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(1, 3, 4, 4, requires_grad=True), torch.randn(5, 3, 3, 3, requires_grad=True)
    context = torch.autocast("cpu", torch.float16, enabled=why == "fp16 autocast")
    if why == "path off":
        monkeypatch.setattr(cpu_paths, "enabled", lambda path: path != "conv_gemm_train_fp32")
    if why == "T2I_KERNELS=torch":
        monkeypatch.setenv("T2I_KERNELS", "torch")
    if why == "mixed dtypes":
        w = w.detach().bfloat16().requires_grad_()
    with context:
        reason = dispatch.gemm_conv_unsupported_reason(x, w)
        if why != "mixed dtypes":
            dispatch.conv2d(x, w, None, 1, 1)
    assert reason is not None and spy == []


def test_bf16_path_is_its_own_switch(spy: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_paths, "enabled", lambda path: path != "conv_gemm_train_bf16")
    x, w = torch.randn(1, 3, 4, 4, requires_grad=True), torch.randn(5, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        assert "conv_gemm_train_bf16" in dispatch.gemm_conv_unsupported_reason(x, w)
    assert dispatch.gemm_conv_unsupported_reason(x, w) is None  # float32 stays on
