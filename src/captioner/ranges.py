"""Checked ranges: the one way every number a user or a file gives is accepted or refused.

A setting comes in many ways (a CLI flag, a TOML file, ``--set``, a Python keyword, a web request,
a checkpoint's ``config.json``), so the rule for it lives with the setting and its message names the
setting, not the way in. Each front end translates a :class:`SettingError` into its own words: the
command line names its flag (``--beam must be ...``), the web API its field (``beam_size must be ...``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from captioner.errors import ConfigError


class SettingError(ConfigError):
    """A setting's value is out of its range or of the wrong type.

    ``setting`` is the setting's own name (``beam_size``), ``requirement`` the rest of the sentence
    (``must be a whole number from 1 to 100, not 10000``).
    """

    def __init__(self, setting: str, requirement: str) -> None:
        self.setting = setting
        self.requirement = requirement
        super().__init__(f"{setting} {requirement}")

    def named(self, names: Mapping[str, str]) -> ConfigError:
        """The same error with the setting called what a front end calls it (``{"beam_size": "--beam"}``)."""
        return ConfigError(f"{names.get(self.setting, self.setting)} {self.requirement}")


def shown(value: Any) -> str:
    """A value as it may appear in a one-line message: short, on one line."""
    text = repr(value) if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:37] + "..."


def whole_number(name: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) in [low, high]; else a :class:`SettingError`."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SettingError(name, f"must be a whole number from {low:,} to {high:,}, not {shown(value)}")
    return value


def number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in [low, high] ((low, high] with ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "above" if low_open else "from"
        raise SettingError(name, f"must be a number {bracket} {low:g} {'and at most' if low_open else 'to'} {high:g}, not {shown(value)}")
    return float(value)


def optional_whole_number(name: str, value: Any, low: int, high: int) -> int | None:
    return None if value is None else whole_number(name, value, low, high)


def optional_number(name: str, value: Any, low: float, high: float) -> float | None:
    return None if value is None else number(name, value, low, high)
