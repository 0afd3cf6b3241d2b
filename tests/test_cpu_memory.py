"""retain_freed_memory(): glibc malloc thresholds for CPU generation."""

from __future__ import annotations

import sys

import pytest
from t2i_engine.utils import cpu_memory


def test_env_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_memory, "_done", False)
    monkeypatch.setenv(cpu_memory.ENV, "0")
    assert cpu_memory.retain_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_sets_thresholds_once_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    monkeypatch.delenv(cpu_memory.ENV, raising=False)
    assert cpu_memory.retain_freed_memory() is True
    assert cpu_memory.retain_freed_memory() is True  # idempotent
