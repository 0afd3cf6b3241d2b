"""``t2i-engine new-plugin NAME --kind KIND``: write a plugin distribution that installs and passes
its tests.

Kinds: ``conditioner`` (a hint conditioner whose effect shows on the shapes model), ``sampler``
(Euler's method), ``model`` (a tiny random model bundle) and ``task`` (writes a greeting). Each
ships a test built on :mod:`t2i_sdk.testing`. ``NAME`` may be given as ``t2i-plugin-NAME``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from string import Template

from t2i_engine.errors import ConfigError

__all__ = ["KINDS", "plugin_name", "write_plugin"]

KINDS = ("conditioner", "sampler", "model", "task")

_PYPROJECT = '''[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "t2i-plugin-$name"
version = "0.1.0"
description = "A t2i-engine $kind plugin."
requires-python = ">=3.11"
dependencies = ["t2i-sdk>=0.1.0"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."t2i_engine.plugins"]
$name = "t2i_plugin_$module.plugin"

[tool.setuptools.packages.find]
include = ["t2i_plugin_$module*"]
'''

_README = '''# t2i-plugin-$name

A t2i-engine $kind plugin. Install it with `pip install -e .`, check `t2i-engine plugins`, and run
its tests with `pytest tests`.
'''


def plugin_name(name: str) -> str:
    """The plugin's short name: ``t2i-plugin-foo`` (or ``t2i_plugin_foo``) is ``foo``; a name that
    is not lowercase letters, digits, ``-`` and ``_`` starting with a letter is a ConfigError."""
    short = re.sub(r"^t2i[-_]plugin[-_]", "", name)
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", short):
        raise ConfigError(f"new-plugin: '{name}' is not a valid plugin name "
                          "(lowercase letters, digits, '-' and '_', starting with a letter)")
    return short


def write_plugin(name: str, parent: Path, *, kind: str = "task") -> Path:
    """Create ``parent/t2i-plugin-NAME`` holding a working ``kind`` plugin and its test; return it."""
    if kind not in KINDS:
        raise ConfigError(f"new-plugin: --kind must be one of {', '.join(KINDS)}, got '{kind}'")
    name = plugin_name(name)
    module = name.replace("-", "_")
    root = parent / f"t2i-plugin-{name}"
    if root.exists():
        raise ConfigError(f"new-plugin: '{root}' already exists")
    template = importlib.import_module(f"t2i_engine.scaffold_templates.{kind}")
    values = {"name": name, "module": module, "kind": kind}
    pkg = root / f"t2i_plugin_{module}"
    (root / "tests").mkdir(parents=True)
    pkg.mkdir()
    (root / "pyproject.toml").write_text(Template(_PYPROJECT).substitute(values))
    (root / "README.md").write_text(Template(_README).substitute(values))
    (pkg / "__init__.py").write_text(f'"""t2i-engine {kind} plugin {name}."""\n')
    (pkg / "plugin.py").write_text(Template(template.PLUGIN).substitute(values))
    (root / "tests" / f"test_{module}.py").write_text(Template(template.TEST).substitute(values))
    return root
