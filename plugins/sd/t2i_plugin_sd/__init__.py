"""Stable Diffusion 1.x/2.x for t2i-engine.

The plugin module :mod:`t2i_plugin_sd.plugin` registers the model type ``stable-diffusion``
and the checkpoint formats in :data:`t2i_plugin_sd.formats.CHECKPOINT_FORMATS`. The model
implements the core's ``LatentDiffusionModel``, so the core's ``sample``, ``train`` and
``precache`` tasks drive it.
"""

__all__: list[str] = []
