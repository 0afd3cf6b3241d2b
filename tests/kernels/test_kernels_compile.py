"""torch.compile(fullgraph=True) traces a block that uses both ops, on either backend; importing
the kernels never imports triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from t2i_engine.kernels import attention, group_norm
from t2i_engine.kernels.attention import attention_reference
from t2i_engine.kernels.group_norm import group_norm_reference


class _Block(nn.Module):
    """GroupNorm+SiLU, then self-attention over the pixels with a residual (a tiny UNet block)."""

    def __init__(self, channels: int = 16, heads: int = 2, groups: int = 4) -> None:
        super().__init__()
        self.heads, self.groups = heads, groups
        self.norm_weight = nn.Parameter(torch.randn(channels) * 0.1 + 1)
        self.norm_bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
        B, C, H, W = x.shape
        gn = group_norm_reference if reference else group_norm
        attn = attention_reference if reference else attention
        h = gn(x, self.groups, self.norm_weight, self.norm_bias, activation="silu")
        h = h.flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(h).view(B, H * W, 3, self.heads, C // self.heads).unbind(2)  # (B, L, heads, d)
        o = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, L, d)
        o = self.out(o.transpose(1, 2).reshape(B, H * W, C))  # (B, L, C)
        return x + o.transpose(1, 2).reshape(B, C, H, W)


def _compiled_matches_reference(backend, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                                 tol: float = 1e-4) -> None:
    torch.manual_seed(0)
    block = _Block(channels=64, heads=2, groups=8) if device == "cuda" else _Block()
    block = block.to(device, dtype)
    shape = (2, 64, 16, 16) if device == "cuda" else (2, 16, 4, 5)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    y = compiled(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    got = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    ref = block(x, reference=True)
    ref.backward(grad_out)
    want = [x.grad] + [p.grad for p in block.parameters()]
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.slow
def test_compile_fullgraph_torch_path(force_torch):
    torch._dynamo.reset()
    _compiled_matches_reference("inductor")


def test_compile_fullgraph_triton_custom_ops(triton_interpreter):
    """The Triton path goes through the torch.library custom ops: fake impls for tracing,
    registered autograd for the backward graph (kernels run under the interpreter)."""
    torch._dynamo.reset()
    _compiled_matches_reference("aot_eager")


def test_import_is_light_and_triton_free():
    code = (
        "import sys, t2i_engine.kernels as k; "
        "from t2i_engine.kernels import attention, group_norm; "
        "assert callable(attention) and callable(group_norm); "
        "assert 'triton' not in sys.modules, 'triton imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_compile_inductor_triton_custom_ops_gpu(force_triton):
    """Inductor compiles a block whose graph holds the Triton custom ops (forward and backward),
    and the compiled block matches the eager reference on a CUDA GPU in float16."""
    from torch._inductor.compile_fx import compile_fx

    seen: list[str] = []

    def inductor_recording_ops(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    _compiled_matches_reference(inductor_recording_ops, device="cuda", dtype=torch.float16, tol=2e-2)
    assert any("t2i_engine.attention_fwd" in t for t in seen), seen
    assert any("t2i_engine.group_norm_fwd" in t for t in seen), seen
