"""The SDK re-exports the contracts and its conformance kit catches broken plugins."""

from __future__ import annotations

import types

import attrs
import pytest

import t2i_engine.interfaces as interfaces
import t2i_sdk
from t2i_engine.errors import PluginError
from t2i_sdk.testing import check_plugin


def test_sdk_reexports_the_contracts() -> None:
    for name in ("TextEncoder", "Autoencoder", "DenoiserNet", "NoiseSchedule", "Sampler",
                 "Conditioner", "Conditioning", "Task", "TextEmbedding", "RunContext"):
        assert getattr(t2i_sdk, name) is getattr(interfaces, name)
    assert t2i_sdk.hookimpl.project_name == "t2i_engine"


def _module(**hooks: object) -> types.ModuleType:
    module = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(module, name, t2i_sdk.hookimpl(fn))
    return module


def test_check_plugin_accepts_a_good_plugin() -> None:
    @attrs.frozen
    class Config:
        steps: int = 3

    def factory(config: Config) -> object:
        return config

    factory.Config = Config  # type: ignore[attr-defined]
    assert check_plugin(_module(register_samplers=lambda: {"mine": factory})) == {"sampler": ["mine"]}


def test_check_plugin_rejects_a_non_attrs_config() -> None:
    class NotAttrs:
        pass

    def factory() -> None:
        return None

    factory.Config = NotAttrs  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match="attrs class"):
        check_plugin(_module(register_tasks=lambda: {"t": factory}))


def test_check_plugin_reports_a_clash_with_the_core() -> None:
    with pytest.raises(PluginError, match="sampler 'euler' is registered by two plugins: 'core'"):
        check_plugin(_module(register_samplers=lambda: {"euler": lambda: None}))


def test_fixtures_give_fresh_managers(engine_pm, isolated_engine_pm) -> None:  # noqa: ANN001
    assert "core" in engine_pm.plugins and set(isolated_engine_pm.plugins) == {"core"}
    assert engine_pm is not isolated_engine_pm
