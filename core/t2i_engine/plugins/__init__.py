"""Plugin discovery and registries (see :mod:`t2i_engine.plugins.manager`)."""

from t2i_engine.plugins.manager import (
    EnginePluginManager,
    PluginInfo,
    Registration,
    get_plugin_manager,
    reset_plugin_manager,
)

__all__ = ["EnginePluginManager", "PluginInfo", "Registration", "get_plugin_manager",
           "reset_plugin_manager"]
