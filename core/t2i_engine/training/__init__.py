"""Lightning Fabric training: the loop, its config, EMA, checkpoints and logging.

Import from the submodules (``t2i_engine.training.loop.fit`` ...); this package imports nothing
heavy itself.
"""

__all__: list[str] = []
