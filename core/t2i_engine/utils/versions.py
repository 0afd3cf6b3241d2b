"""What ``t2i-engine --version`` prints: the versions a bug report needs.

The engine, the SDK, every plugin (loaded or failed, with its distribution's version), Python,
torch with its CUDA build and whether a GPU is usable, and Triton ("not installed" when absent).
Versions come from the installed distributions' metadata; nothing is downloaded.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["distribution_version", "version_report"]


def distribution_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _plugin_lines() -> list[str]:
    from t2i_engine.errors import T2IError
    from t2i_engine.plugins import get_plugin_manager

    try:
        pm = get_plugin_manager()
    except T2IError as exc:  # e.g. two plugins with one name: still print every other version
        return [f"  error: {exc}"]
    lines = []
    for info in pm.plugins.values():
        if info.name == "core":
            continue  # the engine's own built-ins: its version is the first line
        where = f"{info.distribution} {info.version}" if info.distribution else "registered in-process"
        state = "" if info.loaded else f"  [FAILED: {info.error}]"
        lines.append(f"  {info.name} ({where}){state}")
    return lines or ["  (none installed)"]


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not installed"]
    cuda_build = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        available = f"yes ({names})"
    else:
        available = "no"
    return [f"torch: {torch.__version__} (CUDA build: {cuda_build})", f"CUDA available: {available}"]


def version_report() -> str:
    """Multi-line text: engine, SDK and plugin versions, Python, torch, CUDA and Triton."""
    from t2i_engine import __version__

    lines = [f"t2i-engine {__version__}", f"t2i-sdk: {distribution_version('t2i-sdk')}", "plugins:"]
    lines += _plugin_lines()
    lines.append(f"python: {platform.python_version()} ({platform.system()} {platform.machine()})")
    lines += _torch_lines()
    lines.append(f"triton: {distribution_version('triton')}")
    return "\n".join(lines)
