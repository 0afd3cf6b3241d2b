"""The bf16 CPU attention path (baddbmm -> softmax -> bmm, chunked) against a float64 reference,
and when attention() takes it."""

from __future__ import annotations

import importlib

import pytest
import torch

from t2i_engine.kernels import attention
from t2i_engine.kernels.attention import attention_reference

cpu = importlib.import_module("t2i_engine.kernels.attention.cpu")
dispatch = importlib.import_module("t2i_engine.kernels.attention.dispatch")


def _qkv(b: int, h: int, lq: int, lk: int, d: int, *, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize(("lq", "lk", "d"), [(64, 64, 40), (48, 77, 80), (5, 3, 160)])
@pytest.mark.parametrize("budget", [None, 4096, 1])  # one chunk; chunks of heads; chunks of rows
def test_bmm_attention_matches_reference(monkeypatch, lq, lk, d, budget):
    if budget is not None:
        monkeypatch.setattr(cpu, "SCORE_BUDGET", budget)
    q, k, v = _qkv(2, 3, lq, lk, d)
    want = attention_reference(q.double(), k.double(), v.double(), scale=0.3)
    got = cpu.bmm_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_error_is_bf16_sized():
    """In bf16 the error against float64 stays within a small multiple of SDPA's own bf16 error."""
    q, k, v = _qkv(2, 8, 256, 256, 40, seed=1)
    want = attention_reference(q.double(), k.double(), v.double())
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    sdpa_err = (torch.nn.functional.scaled_dot_product_attention(qb, kb, vb).double() - want).abs().mean()
    ours_err = (cpu.bmm_attention(qb, kb, vb).double() - want).abs().mean()
    assert ours_err <= 3 * sdpa_err
    assert ours_err < 2e-2


def test_strided_views_are_read_as_given():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 4, 16, 9, 8, seed=2))
    assert not q.is_contiguous()
    torch.testing.assert_close(cpu.bmm_attention(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_dispatch_takes_it_for_bf16_cpu_inference_only(monkeypatch):
    calls = []
    real = dispatch.bmm_attention
    monkeypatch.setattr(dispatch, "bmm_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 2, 8, 8, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        attention(q, k, v)
        assert len(calls) == 1
        attention(q.float(), k.float(), v.float())  # float32: SDPA
        attention(q, k, v, key_padding_mask=torch.ones(1, 8, dtype=torch.bool))  # a mask: SDPA
        monkeypatch.setenv("T2I_KERNELS", "torch")
        attention(q, k, v)  # forced PyTorch SDPA
    monkeypatch.delenv("T2I_KERNELS")
    attention(q.requires_grad_(), k, v)  # training: SDPA (its backward does not keep the scores)
    assert len(calls) == 1
