"""Shared fixtures for the core and integration tests."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def demo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pip-install the demo plugin distribution for the session, into a folder of this test
    process's own that is put on ``sys.path`` and on ``PYTHONPATH`` (for the CLI subprocesses).

    Not into the venv: pytest-xdist runs one session per worker, and two workers installing and
    uninstalling one distribution in a shared site-packages would race each other.
    """
    src = tmp_path_factory.mktemp("demo") / "t2i-plugin-demo"
    shutil.copytree(DEMO_PLUGIN, src)
    target = tmp_path_factory.mktemp("demo-site")
    done = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
                "--target", str(target), str(src))
    if done.returncode != 0:
        pytest.fail(f"could not pip-install the demo plugin:\n{done.stdout}\n{done.stderr}")
    old_pythonpath = os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), old_pythonpath) if p)
    try:
        yield "t2i-plugin-demo"
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == "t2i_plugin_demo" or m.startswith("t2i_plugin_demo.")]:
            del sys.modules[name]
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
