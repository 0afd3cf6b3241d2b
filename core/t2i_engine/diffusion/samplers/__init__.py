"""Samplers: pure functions ``sample_*(model, x, sigmas, *, generator, callback, **options)``.

``model(x, sigma) -> x0`` is the sampler-space denoiser (see
:mod:`t2i_engine.diffusion.parameterization`); ``sigmas`` decrease to the final level (usually 0).
"""

from t2i_engine.diffusion.samplers.ancestral import sample_ddim, sample_ddpm, sample_euler_ancestral
from t2i_engine.diffusion.samplers.img2img import img2img_start
from t2i_engine.diffusion.samplers.ode import (
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler, sample_heun, sample_lms, sample_plms,
)

__all__ = [
    "img2img_start", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms", "sample_plms",
]
