"""t2i-plugin-controlnet: ControlNet (Zhang et al. 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models") as a ``[[conditioners]]`` entry of t2i-engine."""
