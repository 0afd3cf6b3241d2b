"""Datasets and transforms: shapes, image folders, WebDataset shards, precached latents.

Import from the submodules; the registry of dataset factories is
:data:`t2i_engine.data.registry.DATASETS`.
"""

__all__: list[str] = []
