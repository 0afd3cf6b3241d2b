"""Shared fixtures for the core and integration tests."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def demo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pip-install the demo plugin distribution into this venv for the session, then remove it."""
    src = tmp_path_factory.mktemp("demo") / "t2i-plugin-demo"
    shutil.copytree(DEMO_PLUGIN, src)
    done = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(src))
    if done.returncode != 0:
        pytest.fail(f"could not pip-install the demo plugin:\n{done.stdout}\n{done.stderr}")
    try:
        yield "t2i-plugin-demo"
    finally:
        _pip("uninstall", "--yes", "--quiet", "t2i-plugin-demo")
