"""User-facing errors.

Everything a user can cause (a bad file, a wrong option, a missing checkpoint) raises a
:class:`CaptionerError` subclass whose message is one complete line. The command line prints that
line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """An error caused by the user's input, with a one-line message meant to be shown as is."""

    exit_code = 2


class ImageLoadError(CaptionerError):
    """An image file could not be read (missing, empty, truncated, not an image, too large).

    ``reason`` is a short category ("truncated or corrupt", "not an image", ...) optionally followed
    by details in parentheses, so reports can group failures by what went wrong.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"cannot read image {name}: {reason}")


class DatasetError(CaptionerError):
    """A caption dataset file is malformed, or has no usable records."""


class CheckpointError(CaptionerError):
    """A checkpoint is missing, corrupt, hostile, or does not match its config or vocabulary."""


class ConfigError(CaptionerError):
    """A configuration value is invalid."""
