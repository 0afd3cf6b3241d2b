"""`t2i-engine new-plugin` writes a plugin that passes the SDK's conformance kit."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from tests.helpers import run_cli


def test_new_plugin_scaffold_conforms(tmp_path: Path) -> None:
    done = run_cli("new-plugin", "my-thing", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    root = tmp_path / "t2i-plugin-my-thing"
    assert (root / "pyproject.toml").read_text().count('my-thing = "t2i_plugin_my_thing.plugin"') == 1
    sys.path.insert(0, str(root))
    try:
        plugin = importlib.import_module("t2i_plugin_my_thing.plugin")
        from t2i_sdk.testing import check_plugin

        assert check_plugin(plugin, name="my-thing") == {"task": ["my-thing-hello"]}
    finally:
        sys.path.remove(str(root))
    again = run_cli("new-plugin", "my-thing", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_cli("new-plugin", "Bad Name", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "not a valid plugin name" in bad.stderr
