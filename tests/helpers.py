"""Helpers shared by test modules (import as tests.helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``t2i-engine`` console script in a subprocess."""
    exe = Path(sys.executable).parent / "t2i-engine"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, check=False, timeout=600)


def spy_on(monkeypatch: Any, owner: object, name: str) -> list[tuple]:
    """Replace ``owner.name`` for this test by a wrapper that records each call's positional
    arguments and still calls the original; returns the list it records into."""
    calls: list[tuple] = []
    real = getattr(owner, name)

    def recording(*args: object) -> object:
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(owner, name, recording)
    return calls


def count_draws(monkeypatch: Any) -> list[str]:
    """Wrap every in-place ``torch.nn.init`` function for this test so that each call is recorded
    (by name) in the returned list."""
    from torch import nn

    calls: list[str] = []
    for name in [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]:
        real = getattr(nn.init, name)
        monkeypatch.setattr(nn.init, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    return calls
