"""``t2i-engine new-plugin --kind ...`` writes a plugin whose own tests pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_engine.errors import ConfigError
from t2i_engine.scaffold import plugin_name, write_plugin


@pytest.mark.parametrize("kind", ["conditioner", "sampler", "model", "task"])
def test_each_kind_passes_its_own_tests(tmp_path: Path, kind: str) -> None:
    root = write_plugin(f"my-{kind}", tmp_path, kind=kind)
    assert root.name == f"t2i-plugin-my-{kind}"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


def test_a_prefixed_name_is_not_doubled(tmp_path: Path) -> None:
    root = write_plugin("t2i-plugin-foo", tmp_path, kind="conditioner")
    assert root.name == "t2i-plugin-foo"
    text = (root / "pyproject.toml").read_text()
    assert 'name = "t2i-plugin-foo"' in text and 'foo = "t2i_plugin_foo.plugin"' in text
    assert plugin_name("t2i_plugin_bar") == "bar"


def test_bad_names_and_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid plugin name"):
        write_plugin("t2i-plugin-", tmp_path)
    with pytest.raises(ConfigError, match="--kind must be one of conditioner, sampler, model, task"):
        write_plugin("x", tmp_path, kind="widget")
