"""captioner: turn pictures into sentences.

A pretrained CNN encodes the image; an LSTM decoder, with or without soft attention, writes the
caption ("Show and Tell", Vinyals et al. 2015; "Show, Attend and Tell", Xu et al. 2015).

>>> from captioner import Captioner
>>> model = Captioner.load("default")                 # the model that ships inside the package
>>> model.caption("examples/dog.jpg", beam_size=5).text
'a black dog is running on the grass'
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from captioner.errors import CaptionerError

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner, CaptionResult

__all__ = ["Captioner", "CaptionResult", "CaptionerError", "__version__"]


@lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # 30 ms: only when asked for

    try:
        return version("captioner")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    # Captioner pulls in torch: import it on first use, so `captioner --help` stays instant.
    if name in ("Captioner", "CaptionResult"):
        from captioner.models import captioner as module

        return getattr(module, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
