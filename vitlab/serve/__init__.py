"""``vitlab serve``: a model behind an HTTP API and a web page, with dynamic batching.

- :func:`create_app`: the ASGI (FastAPI) app for a model, a checkpoint or name ``vitlab.load`` reads, or an
  ``.onnx`` file; mount it in your own server or run it with uvicorn.
- :func:`run_server`: serve an app with uvicorn until SIGINT / SIGTERM (requests already accepted are answered).
- :class:`BackgroundServer`: the same in a background thread (notebooks, tests, benchmarks).
- :class:`Engine`, :func:`load_engine`: the model side (preprocessing, probabilities, attention rollout).
- :class:`Batcher`: the dynamic batching queue.

Needs the ``serve`` extra: ``pip install 'vitlab[serve]'`` (fastapi, uvicorn, python-multipart, prometheus-client).
See docs/serving.md.
"""

from .app import ApiError, ServeSettings, create_app
from .batching import Batcher, BatcherClosed, QueueFull
from .engine import BACKENDS, Engine, Rollout, load_engine
from .server import BackgroundServer, bind_socket, run_server

__all__ = ["BACKENDS", "ApiError", "BackgroundServer", "Batcher", "BatcherClosed", "Engine", "QueueFull", "Rollout",
           "ServeSettings", "bind_socket", "create_app", "load_engine", "run_server"]
