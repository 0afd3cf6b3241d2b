"""Conformance checks a plugin runs in its own tests.

    from t2i_sdk.testing import check_plugin
    import t2i_plugin_mine.plugin

    def test_conforms():
        check_plugin(t2i_plugin_mine.plugin)

The checks: the module registers cleanly beside the core (no name clashes), every registration
hook returns ``str -> callable``, every declared ``Config`` is a frozen attrs class with
annotated fields whose defaults (when all fields have defaults) build, and factories that need
no arguments build. :func:`check_conditioner` (from :mod:`t2i_sdk.conditioner_kit`) checks a
conditioner's behaviour through the core's chain on a tiny model.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import attrs

from t2i_engine.errors import PluginError
from t2i_engine.hookspecs import REGISTRATION_HOOKS
from t2i_engine.plugins.manager import EnginePluginManager, Registration
from t2i_sdk.conditioner_kit import check_conditioner

__all__ = ["check_conditioner", "check_plugin", "check_registration", "check_training_lowers_loss",
           "plugin_manager_with"]


def plugin_manager_with(module: ModuleType | object, *, name: str = "under-test") -> EnginePluginManager:
    """A fresh manager holding the core's built-ins and ``module`` only (no autoload)."""
    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(module, name=name)
    return pm


def check_registration(reg: Registration) -> None:
    """Check one registered factory (raises AssertionError naming it)."""
    label = f"{reg.kind} '{reg.name}' (plugin '{reg.plugin}')"
    assert isinstance(reg.name, str) and reg.name, f"{label}: names must be non-empty strings"
    assert callable(reg.factory), f"{label}: the factory must be callable"
    schema: Any = getattr(reg.factory, "Config", None)
    if schema is None:
        return
    assert attrs.has(schema), f"{label}: Config must be an attrs class"
    fields = attrs.fields(schema)
    for f in fields:
        assert f.type is not None, f"{label}: Config field '{f.name}' has no type annotation"
    if all(f.default is not attrs.NOTHING for f in fields):
        config = schema()
        try:
            attrs.evolve(config)
        except Exception as exc:  # pragma: no cover - evolve only fails on broken classes
            raise AssertionError(f"{label}: Config cannot be copied: {exc}") from exc


def check_plugin(module: ModuleType | object, *, name: str = "under-test") -> dict[str, list[str]]:
    """Run every check on ``module``; returns what it registers (kind -> names)."""
    pm = plugin_manager_with(module, name=name)
    registries = pm.registries()
    info = pm.plugins[name]
    assert info.error is None, f"plugin '{name}' failed: {info.error}"
    for (kind, component), plugins in pm.clashes.items():
        if name in plugins:  # the manager withholds the name; a plugin's own test should fail on it
            raise PluginError(f"{kind} '{component}' is registered by two plugins: "
                              + " and ".join(f"'{p}'" for p in plugins))
    for kind in REGISTRATION_HOOKS.values():
        for reg in registries[kind].values():
            if reg.plugin == name:
                check_registration(reg)
    return info.registers


def check_training_lowers_loss(model: Any, batch: Any, *, steps: int = 8, lr: float = 2e-3,
                               eval_seeds: int = 3) -> tuple[float, float]:
    """A few AdamW steps of ``model.training_loss`` on one batch must lower its loss.

    ``model`` is a :class:`~t2i_engine.training.protocol.TrainableModel`. The loss is measured
    before and after over ``eval_seeds`` fixed noise draws (the same ones both times), so the
    comparison is not noise. Returns ``(before, after)``; raises AssertionError when it did not
    go down.
    """
    import torch

    def measured() -> float:
        with torch.no_grad():
            return float(sum(model.training_loss(batch, generator=torch.Generator().manual_seed(s))
                             for s in range(eval_seeds)))

    opt = torch.optim.AdamW(list(model.trainable_parameters()), lr=lr)
    before = measured()
    for step in range(steps):
        loss = model.training_loss(batch, generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measured()
    assert after < before, f"training did not lower the loss: {before:.6g} -> {after:.6g}"
    return before, after
