"""Diffusion maths: noise schedules, parameterizations, samplers, guidance and their registry.

Submodules: :mod:`.schedules`, :mod:`.parameterization`, :mod:`.samplers`, :mod:`.guidance`,
:mod:`.registry` (the ``SAMPLERS`` and ``SCHEDULES`` name -> factory mappings).
"""
