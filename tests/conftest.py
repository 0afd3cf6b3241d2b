"""Shared fixtures for the core and integration tests."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_PLUGIN = ROOT / "tests" / "fixtures" / "t2i-plugin-demo"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, check=False)


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest) -> None:
    """``@pytest.mark.gpu`` tests are skipped unless CUDA is available."""
    if request.node.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def demo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Install the demo plugin distribution into a temporary folder (``pip install --target``)
    and put that folder first on ``sys.path`` and ``PYTHONPATH`` for the session, so in-process
    discovery and the console script both find its entry points. The shared environment is
    never changed."""
    src = tmp_path_factory.mktemp("demo") / "t2i-plugin-demo"
    shutil.copytree(DEMO_PLUGIN, src)
    target = tmp_path_factory.mktemp("demo-site")
    done = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
                "--target", str(target), str(src))
    if done.returncode != 0:
        pytest.fail(f"could not pip-install the demo plugin into {target}:\n{done.stdout}\n{done.stderr}")
    old_path, old_env = list(sys.path), os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *([old_env] if old_env else [])])
    importlib.invalidate_caches()
    try:
        yield "t2i-plugin-demo"
    finally:
        sys.path[:] = old_path
        for name in [m for m in sys.modules if m == "t2i_plugin_demo" or m.startswith("t2i_plugin_demo.")]:
            del sys.modules[name]
        if old_env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_env
