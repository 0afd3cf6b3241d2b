"""``t2i-engine new-plugin NAME``: write a plugin distribution that installs and passes its tests.

The result registers one task, ``<name>-hello``, with a typed Config, and ships a conformance
test built on :mod:`t2i_sdk.testing`.
"""

from __future__ import annotations

import re
from pathlib import Path

from t2i_engine.errors import ConfigError

_PYPROJECT = '''[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "t2i-plugin-{name}"
version = "0.1.0"
description = "A t2i-engine plugin."
requires-python = ">=3.11"
dependencies = ["t2i-sdk>=0.1.0"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."t2i_engine.plugins"]
{name} = "t2i_plugin_{module}.plugin"

[tool.setuptools.packages.find]
include = ["t2i_plugin_{module}*"]
'''

_PLUGIN = '''"""The {name} plugin: registers its components with t2i-engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from t2i_sdk import RunContext, hookimpl, option


class Hello:
    """A task that writes a greeting to engine.output_dir/hello.txt."""

    @attrs.frozen
    class Config:
        greeting: str = option(default="hello", help="what to write")

    def __init__(self, config: Config) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        path = ctx.output_dir / "hello.txt"
        path.write_text(self.config.greeting + "\\n")
        return {{"wrote": str(path)}}


@hookimpl
def register_tasks() -> Mapping[str, Any]:
    return {{"{name}-hello": Hello}}
'''

_TEST = '''import t2i_plugin_{module}.plugin as plugin
from t2i_sdk.testing import check_plugin


def test_conforms() -> None:
    registers = check_plugin(plugin, name="{name}")
    assert registers == {{"task": ["{name}-hello"]}}
'''


def write_plugin(name: str, parent: Path) -> Path:
    """Create ``parent/t2i-plugin-NAME`` and return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ConfigError(f"new-plugin: '{name}' is not a valid plugin name "
                          "(lowercase letters, digits, '-' and '_', starting with a letter)")
    module = name.replace("-", "_")
    root = parent / f"t2i-plugin-{name}"
    if root.exists():
        raise ConfigError(f"new-plugin: '{root}' already exists")
    pkg = root / f"t2i_plugin_{module}"
    (root / "tests").mkdir(parents=True)
    pkg.mkdir()
    (root / "pyproject.toml").write_text(_PYPROJECT.format(name=name, module=module))
    (pkg / "__init__.py").write_text(f'"""t2i-engine plugin {name}."""\n')
    (pkg / "plugin.py").write_text(_PLUGIN.format(name=name))
    (root / "tests" / f"test_{module}.py").write_text(_TEST.format(name=name, module=module))
    (root / "README.md").write_text(f"# t2i-plugin-{name}\n\nInstall: `pip install -e .`; "
                                    f"check: `t2i-engine plugins`.\n")
    return root
