"""``t2i-engine serve``: an HTTP API and a web page over one resident model.

The job is any sampling job whose ``[task]`` is ``serve`` (:class:`~t2i_engine.serve.config.ServeConfig`);
its model, conditioners, adapters, sampler and guidance are the defaults every request starts
from. FastAPI and uvicorn are an optional extra (``pip install 't2i-engine[serve]'``), imported
only when the server starts. See docs/serving.md.
"""

from t2i_engine.serve.config import GenerationRequest, ServeConfig

__all__ = ["GenerationRequest", "ServeConfig"]
