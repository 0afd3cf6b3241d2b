"""build_optimizer(): the fused AdamW takes the same steps as PyTorch's reference (for-each) AdamW."""

from __future__ import annotations

import torch

from t2i_engine.training.config import TrainConfig
from t2i_engine.training.optim import build_optimizer, fused_supported


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((64, 3, 3, 3), (64,), (10, 64))]


def test_fused_matches_foreach_adamw():
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6)
    ours, ref = _params(0), _params(0)
    opt = build_optimizer(ours, cfg)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6, foreach=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_only_where_supported():
    params = _params(0)
    assert fused_supported(params, TrainConfig())
    assert not fused_supported(params, TrainConfig(strategy="fsdp"))
    assert not fused_supported([], TrainConfig())
    assert build_optimizer(params, TrainConfig(strategy="fsdp")).defaults["fused"] is None
