"""`make wheels` packaging: every plugin builds into a wheel that installs offline and is found.

Each plugin folder is built the way the Makefile's ``wheels`` target builds it (pip, no build
isolation, no network), installed with ``pip install --no-index --target`` into an empty folder,
and the installed copy must declare its ``t2i_engine.plugins`` entry point, ship its package's
modules, and import from that folder (not from the editable checkout).
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
                   check=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), *map(str, PLUGINS))
    return {w.name.split("-")[0]: w for w in out.glob("*.whl")}


@pytest.mark.parametrize("plugin", PLUGINS, ids=[p.name for p in PLUGINS])
def test_plugin_wheel_installs_offline_and_declares_its_entry_point(
        plugin: Path, wheels: dict[str, Path], tmp_path: Path) -> None:
    package = f"t2i_plugin_{plugin.name}"
    wheel = wheels[package]
    sources = {p.relative_to(plugin).as_posix() for p in (plugin / package).rglob("*.py")}
    assert sources <= set(zipfile.ZipFile(wheel).namelist()), "the wheel lacks modules of the package"

    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    dists = [d for d in md.distributions(path=[str(target)])]
    assert [d.metadata["Name"] for d in dists] == [f"t2i-plugin-{plugin.name}"]
    eps = [ep for ep in dists[0].entry_points if ep.group == "t2i_engine.plugins"]
    assert len(eps) == 1 and eps[0].value == f"{package}.plugin"

    # the installed copy imports (from the target, ahead of the editable checkout)
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); import {eps[0].value} as m; "
            f"print(m.__file__)")
    where = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           timeout=120).stdout.strip()
    assert Path(where).is_relative_to(target)
