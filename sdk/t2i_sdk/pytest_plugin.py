"""pytest plugin installed with t2i-sdk: fixtures for plugin tests.

* ``engine_pm``: a fresh plugin manager with the core built-ins and every installed plugin.
* ``isolated_engine_pm``: the same without entry-point autoload.
"""

from __future__ import annotations

import pytest

from t2i_engine.plugins.manager import EnginePluginManager


@pytest.fixture
def engine_pm() -> EnginePluginManager:
    """A fresh, fully loaded plugin manager."""
    return EnginePluginManager().load()


@pytest.fixture
def isolated_engine_pm() -> EnginePluginManager:
    """A fresh plugin manager with only the core built-ins."""
    return EnginePluginManager().load(autoload=False)
