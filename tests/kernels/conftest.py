"""Fixtures for the kernel tests.

* ``@pytest.mark.gpu`` tests are skipped unless CUDA is available.
* ``triton_interpreter`` forces the Triton path (``T2I_KERNELS=triton``) and runs it on CPU
  tensors under Triton's interpreter (``TRITON_INTERPRET=1``), for this test only. The kernels
  pick compiled or interpreted code per call from the tensors' device, so nothing depends on
  when triton was imported and other tests are unaffected.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the Triton kernels and run them on CPU through the interpreter."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("T2I_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton kernels (GPU tests)."""
    monkeypatch.setenv("T2I_KERNELS", "triton")


@pytest.fixture
def force_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the PyTorch path."""
    monkeypatch.setenv("T2I_KERNELS", "torch")
