"""retain_freed_memory(): glibc malloc thresholds for CPU generation and training."""

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


_FAULTS = """
import resource, torch
from t2i_engine.utils.cpu_memory import retain_freed_memory
retain_freed_memory()
for _ in range(12):  # warm up: the heap settles after its first few large blocks
    x = torch.empty(16 << 20).fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.empty(16 << 20).fill_(1.0)  # 64 MiB, every page touched
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    """The behaviour it is for: a freed 64 MiB tensor (above the 32 MiB ceiling of glibc's
    adaptive mmap threshold, like UNet activations and weight casts) is reused without faulting
    its pages back in; with the switch off, every re-allocation faults them all in again."""
    import os
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")

    def faults(switch: str) -> int:
        env = {**os.environ, cpu_memory.ENV: switch}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = 10 * (64 << 20) // 4096  # every page of every allocation
    assert faults("0") > pages // 2  # glibc's defaults: fresh zero-filled pages each time
    assert faults("1") < pages // 100


_RELEASE = """
import torch
from t2i_engine.utils.cpu_memory import release_free_memory, retain_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
assert retain_freed_memory()
keep = torch.ones(1 << 20)  # a small live block above the freed one, so the heap top cannot shrink
x = torch.empty(32 << 20).fill_(1.0)  # 128 MiB, retained in the heap once freed
keep2 = torch.ones(1 << 20)
del x
held = rss()
assert release_free_memory()
print(held - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_hands_retained_pages_back() -> None:
    """A freed 128 MiB block the retain switch keeps resident goes back to the system on release."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) > 100 << 20
