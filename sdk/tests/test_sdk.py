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


def test_sdk_exports_what_a_conditioner_plugin_needs() -> None:
    import t2i_engine.conditioning as conditioning
    import t2i_engine.pipeline as pipeline

    assert t2i_sdk.generate is pipeline.generate and t2i_sdk.seeded_noise is pipeline.seeded_noise
    assert t2i_sdk.load_image is conditioning.load_image
    assert t2i_sdk.unet_residual_shapes is conditioning.unet_residual_shapes
    for name in ("ConditionInputs", "Residuals", "Branch"):
        assert getattr(t2i_sdk, name) is getattr(interfaces, name)
    import t2i_engine.serve.generators as generators

    for name in ("Generator", "Upload", "Draft", "Resident"):  # a serve generator's plugin needs these
        assert getattr(t2i_sdk, name) is getattr(generators, name)
    assert sorted(t2i_sdk.__all__) == sorted(set(t2i_sdk.__all__))
    for name in t2i_sdk.__all__:
        assert hasattr(t2i_sdk, name), name


def test_unet_residual_shapes_match_the_core_unet() -> None:
    import torch

    from t2i_engine.nn.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(channels=(8, 16, 16), attention=(False, False, False), heads=(1, 1, 1),
                           layers_per_block=2, context_dim=8, groups=4))
    down, mid = t2i_sdk.unet_residual_shapes(unet, 7, 10)
    seen: dict[str, list] = {"down": [], "mid": []}
    unet.mid_block.register_forward_hook(lambda m, i, o: seen["mid"].append(tuple(o.shape[1:])))
    residuals = [torch.zeros(1, *s) for s in down]  # the UNet zips them with its skips strictly
    text = interfaces.Conditioning(text=interfaces.TextEmbedding(torch.zeros(1, 2, 8)))
    unet(torch.zeros(1, 4, 7, 10), torch.zeros(1), text, down_residuals=residuals,
         mid_residual=torch.zeros(1, *mid))
    assert seen["mid"] == [mid]
