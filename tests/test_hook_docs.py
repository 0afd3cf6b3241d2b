"""Every hookspec is documented in docs/hooks.md and exercised by some test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from t2i_engine import hookspecs

ROOT = Path(__file__).resolve().parents[1]
SPECS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "t2i_engine_spec")]


def test_specs_are_found() -> None:
    assert set(SPECS) == set(hookspecs.REGISTRATION_HOOKS) | set(hookspecs.LIFECYCLE_HOOKS)


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_typed_and_documented(name: str) -> None:
    fn = getattr(hookspecs, name)
    assert fn.__doc__ and "Combining:" in fn.__doc__, f"{name}: docstring must say how results combine"
    assert "return" in inspect.get_annotations(fn), f"{name}: return type missing"
    assert f"`{name}`" in (ROOT / "docs" / "hooks.md").read_text(), f"{name} is not in docs/hooks.md"


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_exercised_by_a_test(name: str) -> None:
    sources = [p for p in list((ROOT / "tests").rglob("*.py")) + list((ROOT / "plugins").rglob("tests/*.py"))
               if p.name != Path(__file__).name and "fixtures" not in p.parts]
    assert any(name in p.read_text() for p in sources), f"no test mentions hook {name}"
