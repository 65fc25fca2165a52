"""``captioner serve``: a web demo and JSON API for a captioning model, with dynamic batching.

>>> import httpx
>>> from captioner import Captioner
>>> from captioner.serve import BackgroundServer, ServeConfig, create_app
>>> app = create_app(Captioner.load("default"), ServeConfig(beam_size=3))
>>> with BackgroundServer(app) as server:  # on 127.0.0.1, a free port
...     answer = httpx.post(server.url + "api/caption", files={"image": open("examples/dog.jpg", "rb")}).json()
>>> answer["caption"]
'a black dog is running on the grass'

Modules: ``config`` (settings), ``batching`` (the dynamic batcher), ``captioning`` (uploads, the model
runner, the JSON answer), ``middleware`` (the request body's size and time limits, internal errors as
JSON), ``app`` (routes), ``server`` (uvicorn, with a header deadline and a connection limit),
``static/`` (the page). The web parts need FastAPI, uvicorn and python-multipart; they are imported
on first use, so ``captioner.serve.config`` and ``captioner.serve.batching`` work without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioner.serve.app import create_app
    from captioner.serve.batching import BatchStats, DynamicBatcher
    from captioner.serve.config import DecodeSettings, ServeConfig
    from captioner.serve.server import BackgroundServer, bind_socket

_EXPORTS = {
    "create_app": "captioner.serve.app",
    "BatchStats": "captioner.serve.batching",
    "DynamicBatcher": "captioner.serve.batching",
    "DecodeSettings": "captioner.serve.config",
    "ServeConfig": "captioner.serve.config",
    "BackgroundServer": "captioner.serve.server",
    "bind_socket": "captioner.serve.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'captioner.serve' has no attribute {name!r}")
