"""t2i-engine: a plugin-based text-to-image diffusion engine.

The core holds the contracts (:mod:`t2i_engine.interfaces`), the plugin system
(:mod:`t2i_engine.plugins`), configuration, diffusion maths, kernels, nn building blocks,
the Fabric training loop, data and checkpoint I/O. Models live in plugins.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("t2i-engine")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
