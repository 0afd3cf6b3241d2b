"""The dispatch rule of ``T2I_KERNELS`` for CUDA inputs, checked without a GPU (the rule reads the
device type only): ``auto`` keeps PyTorch's ops, which outran the Triton kernels on an H200
(docs/kernels.md, "GPU figures"); ``triton`` opts in."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.kernels import KernelUnavailableError
from t2i_engine.kernels._backend import use_triton

CUDA = torch.device("cuda")


@pytest.mark.parametrize("op", ["attention", "group_norm"])
def test_auto_keeps_cuda_inputs_on_pytorch(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    monkeypatch.delenv("T2I_KERNELS", raising=False)
    assert not use_triton(op, CUDA, None)
    monkeypatch.setenv("T2I_KERNELS", "auto")
    assert not use_triton(op, CUDA, None)


def test_forced_triton_takes_supported_cuda_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("T2I_KERNELS", "triton")
    assert use_triton("attention", CUDA, None)
    with pytest.raises(KernelUnavailableError, match="attention: T2I_KERNELS=triton but float32 inputs"):
        use_triton("attention", CUDA, "float32 inputs")


def test_torch_never_takes_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_KERNELS", "torch")
    assert not use_triton("attention", CUDA, None)
