"""t2i-plugin-imagen: pixel-space text-to-image diffusion (Imagen, DeepFloyd IF) for t2i-engine.

Entry point ``imagen`` (:mod:`t2i_plugin_imagen.plugin`) registers ``[model] type = "imagen"``.
"""
