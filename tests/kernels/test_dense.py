"""The dense ops' oneDNN path (float32 CPU inference) against PyTorch's F.linear / F.conv2d, and
the conditions that send a call to one path or the other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from t2i_engine.kernels.dense import conv2d, linear, onednn_unsupported_reason
from t2i_engine.nn import ops

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(16, 24), (2, 9, 24), (3, 2, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_reference(shape: tuple[int, ...], with_bias: bool) -> None:
    g = _gen()
    x, w = torch.randn(*shape, generator=g), torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if with_bias else None
    with torch.inference_mode():
        assert onednn_unsupported_reason(x, w, b) is None
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (*shape[:-1], 40)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_conv_matches_reference(memory_format: torch.memory_format, with_bias: bool) -> None:
    g = _gen(1)
    x = torch.randn(2, 12, 5, 7, generator=g).contiguous(memory_format=memory_format)
    w = torch.randn(20, 12, 1, 1, generator=g)
    b = torch.randn(20, generator=g) if with_bias else None
    with torch.no_grad():
        got = conv2d(x, w, b)
    torch.testing.assert_close(got, F.conv2d(x, w, b), rtol=1e-5, atol=1e-5)


def test_other_convolutions_are_unchanged() -> None:
    g = _gen(2)
    x = torch.randn(1, 4, 6, 6, generator=g)
    for w, kwargs in [(torch.randn(8, 4, 3, 3, generator=g), {"padding": 1}),
                      (torch.randn(8, 4, 1, 1, generator=g), {"stride": 2}),
                      (torch.randn(8, 2, 1, 1, generator=g), {"groups": 2})]:
        with torch.no_grad():
            torch.testing.assert_close(conv2d(x, w, None, **kwargs), F.conv2d(x, w, None, **kwargs))


def test_reasons_for_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(16, 8), torch.randn(4, 8, requires_grad=True)
    assert onednn_unsupported_reason(x, w) == "a gradient is needed"
    with torch.no_grad():
        assert onednn_unsupported_reason(x, w) is None
        assert onednn_unsupported_reason(x.double(), w) == "not all tensors are float32 CPU tensors"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn_unsupported_reason(x, w) == "CPU autocast is on"
            assert linear(x, w).dtype == torch.bfloat16  # autocast's own bf16 path
        monkeypatch.setenv("T2I_KERNELS", "torch")
        assert onednn_unsupported_reason(x, w) == "T2I_KERNELS=torch"


def test_training_keeps_autograd() -> None:
    g = _gen(3)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    w, b = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)
    linear(x, w, b).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).square().sum().backward()
    for got, want in zip(grads, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(16, 24), (2, 9, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("trainable", ["all", "frozen weight", "frozen input"])
@pytest.mark.parametrize("onednn_backward", [True, False])
def test_training_linear_runs_onednn_with_reference_gradients(shape: tuple[int, ...], with_bias: bool,
                                                              trainable: str, onednn_backward: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backward GEMM paths (path ``dense_fp32_train_backward`` on: oneDNN on transposed
    copies; off: ``torch.mm``) give ``F.linear``'s gradients."""
    from t2i_engine.kernels import cpu_paths
    from t2i_engine.kernels.dense import dispatch

    monkeypatch.setattr(cpu_paths, "enabled", lambda path: path != "dense_fp32_train_backward" or onednn_backward)

    g = _gen(4)
    x = torch.randn(*shape, generator=g, requires_grad=trainable != "frozen input")
    w = torch.randn(40, 24, generator=g, requires_grad=trainable != "frozen weight")
    b = torch.randn(40, generator=g, requires_grad=True) if with_bias else None
    up = torch.randn(*shape[:-1], 40, generator=g)
    assert dispatch.onednn_training_unsupported_reason(x, w, b) is None
    calls: list[bool] = []
    original = dispatch.OneDNNLinear.apply
    try:
        dispatch.OneDNNLinear.apply = lambda *a: calls.append(a[3]) or original(*a)  # type: ignore[method-assign]
        out = linear(x, w, b)
    finally:
        dispatch.OneDNNLinear.apply = original  # type: ignore[method-assign]
    assert calls == [onednn_backward] and out.shape == (*shape[:-1], 40)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad((out * up).sum(), leaves)
    want = torch.autograd.grad((F.linear(x, w, b) * up).sum(), leaves)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_training_path_conditions(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2i_engine.kernels.dense.dispatch import onednn_training_unsupported_reason as reason

    x, w = torch.randn(16, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    assert reason(x, w) is None
    assert reason(x.double(), w) == "not all tensors are float32 CPU tensors"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reason(x, w) == "CPU autocast is on"
    monkeypatch.setenv("T2I_KERNELS", "torch")
    assert reason(x, w) == "T2I_KERNELS=torch"


def test_training_linear_is_once_differentiable() -> None:
    x, w = torch.randn(16, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(linear(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


def test_modules_keep_torch_state_dicts() -> None:
    torch.manual_seed(0)
    ref_lin, ref_conv = nn.Linear(8, 6), nn.Conv2d(8, 6, 1)
    lin, conv = ops.Linear(8, 6), ops.Conv2d(8, 6, 1)
    lin.load_state_dict(ref_lin.state_dict())
    conv.load_state_dict(ref_conv.state_dict())
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv2d)
    x = torch.randn(2, 8, 3, 3)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), ref_conv(x))
        torch.testing.assert_close(lin(x.flatten(2).transpose(1, 2)), ref_lin(x.flatten(2).transpose(1, 2)))


def test_compile_traces_the_modules() -> None:
    torch.manual_seed(0)
    lin, conv = ops.Linear(8, 4), ops.Conv2d(8, 8, 1)

    def block(x: torch.Tensor) -> torch.Tensor:
        return lin(conv(x).flatten(2).transpose(1, 2))

    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="eager")(x), block(x))
