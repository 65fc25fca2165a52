"""captioner: turn pictures into sentences.

A pretrained CNN encodes the image; an LSTM decoder, with or without soft attention, writes the
caption ("Show and Tell", Vinyals et al. 2015; "Show, Attend and Tell", Xu et al. 2015).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("captioner")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from captioner.errors import CaptionerError

__all__ = ["CaptionerError", "__version__"]
