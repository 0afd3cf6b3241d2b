"""Stable Diffusion 1.x/2.x for t2i-engine.

The plugin module :mod:`t2i_plugin_sd.plugin` registers the model type ``stable-diffusion``,
its ``sample`` and ``train`` tasks and the checkpoint formats in :data:`CHECKPOINT_FORMATS`.
"""

__all__: list[str] = []
