"""group_norm(): Triton kernels (interpreter on CPU, compiled on GPU) and the PyTorch path
against the float32 reference, forward and backward, NCHW and channels_last."""

from __future__ import annotations

import importlib

import pytest
import torch

from t2i_engine.kernels import KernelUnavailableError, group_norm
from t2i_engine.kernels.group_norm import group_norm_reference

TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _inputs(shape, dtype, device="cpu", *, channels_last=False, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0 + 3.0).to(device, dtype)  # off-centre on purpose
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    C = shape[1]
    weight = bias = None
    if affine:
        weight = (torch.randn(C, generator=g) * 0.5 + 1.0).to(device).requires_grad_()
        bias = (torch.randn(C, generator=g) * 0.5).to(device).requires_grad_()
    return x, weight, bias


def _check(x, num_groups, weight, bias, *, activation, eps=1e-5):
    """Compare group_norm() with the reference, forward and backward (dx, dweight, dbias)."""
    tol = TOL[x.dtype]
    y = group_norm(x, num_groups, weight, bias, eps=eps, activation=activation)
    ref = group_norm_reference(x, num_groups, weight, bias, eps=eps, activation=activation)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * 4, rtol=tol)
    params = [p for p in (x, weight, bias) if p is not None]
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(ref, params, dy)
    for i, (a, b) in enumerate(zip(got, want)):
        mag = b.float().abs().max().item() + 1.0
        torch.testing.assert_close(a.float(), b.float(), atol=4 * tol * mag, rtol=4 * tol, msg=f"grad {i}")
    return y


# (shape, groups): channel counts with 1, 4, 10 and 12 channels per group (not powers of two),
# odd spatial sizes, a 3-D (B, C, L) input.
INTERP_GRID = [
    ((2, 12, 5, 7), 3),
    ((2, 40, 5, 6), 4),
    ((1, 8, 30), 2),
    ((2, 6, 3, 11), 6),
    ((1, 16, 12, 20), 4),
]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,groups", INTERP_GRID)
def test_triton_matches_reference_interpreter(triton_interpreter, shape, groups, dtype, channels_last, activation):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    x, w, b = _inputs(shape, dtype, channels_last=channels_last)
    y = _check(x, groups, w, b, activation=activation)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("affine", ["none", "weight"])
def test_triton_without_affine_interpreter(triton_interpreter, affine):
    x, w, _ = _inputs((2, 12, 5, 7), torch.float32, affine=affine == "weight")
    _check(x, 4, w, None, activation="silu")


def test_many_tiles_interpreter(triton_interpreter):
    """A group larger than one tile: statistics merged across tiles (Chan et al.)."""
    x, w, b = _inputs((1, 4, 40, 40), torch.float32)
    _check(x, 2, w, b, activation="silu", eps=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_torch_path_matches_reference(force_torch, channels_last):
    x, w, b = _inputs((2, 12, 5, 7), torch.float32, channels_last=channels_last)
    _check(x, 3, w, b, activation="silu")


def test_bad_arguments_are_errors():
    x, w, b = _inputs((2, 12, 5, 7), torch.float32)
    with pytest.raises(ValueError, match="divisible"):
        group_norm(x, 5, w, b)
    with pytest.raises(ValueError, match="activation"):
        group_norm(x, 3, w, b, activation="gelu")  # type: ignore[arg-type]


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("T2I_KERNELS", raising=False)
    dispatch = importlib.import_module("t2i_engine.kernels.group_norm.dispatch")
    called = []
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: called.append(1) or None)
    x, w, b = _inputs((1, 4, 3, 3), torch.float32)
    group_norm(x, 2, w, b, activation="silu")
    assert not called


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("T2I_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b = _inputs((1, 4, 3, 3), torch.float32)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        group_norm(x, 2, w, b)


def test_custom_ops_pass_opcheck(triton_interpreter):
    importlib.import_module("t2i_engine.kernels.group_norm.triton")  # registers the ops
    x, w, b = _inputs((2, 6, 5, 4), torch.float32, channels_last=True)
    torch.library.opcheck(torch.ops.t2i_engine.group_norm_fwd, (x, w, b, 3, 1e-5, True))


# ---------------------------------------------------------------------------------------------
# GPU: SD shapes, compiled kernels, bf16.

GPU_GRID = [
    ((2, 320, 64, 64), 32),  # SD 1.5 UNet, 512 px, first level
    ((2, 1280, 8, 8), 32),
    ((2, 640, 128, 128), 32),  # 1024 px
    ((1, 128, 512, 512), 32),  # VAE decoder at full resolution
    ((4, 96, 33, 17), 24),  # odd sizes
    ((2, 300, 1000), 30),
]


@pytest.mark.gpu
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,groups", GPU_GRID)
def test_triton_matches_reference_gpu(force_triton, shape, groups, dtype, channels_last, activation):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    x, w, b = _inputs(shape, dtype, "cuda", channels_last=channels_last)
    _check(x, groups, w, b, activation=activation)


def test_eager_triton_calls_skip_the_custom_op_interpreter(triton_interpreter):
    """Eager calls run the launchers under a plain autograd.Function whose only output is ``y``
    (docs/kernels.md: the custom-op route took 1.14 ms of host time per forward+backward at a
    tiny shape on an H200, eager PyTorch 0.30 ms); gradients are the reference's."""
    x, w, b = _inputs((2, 4, 3, 3), torch.float32)
    y = group_norm(x, 2, w, b, activation="silu")
    assert type(y.grad_fn).__name__ == "_EagerGroupNormBackward"
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    group_norm_reference(x, 2, w, b, activation="silu").square().sum().backward()
    for a, t in zip(got, (x, w, b)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)
