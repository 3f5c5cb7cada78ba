"""Typed errors. Every message a user sees names the place to fix."""
from __future__ import annotations

from typing import Optional


class DarknetError(Exception):
    """Base class of every error this package raises on bad user input."""


class DarknetCfgError(DarknetError, ValueError):
    """A cfg that cannot be interpreted: ``file:line: [section] key: message``."""

    def __init__(self, message: str, file: Optional[str] = None, line: Optional[int] = None,
                 section: Optional[str] = None, key: Optional[str] = None):
        self.file, self.line, self.section, self.key = file, line, section, key
        self.reason = message
        super().__init__(format_location(file, line, section, key) + message)


class DarknetWeightsError(DarknetError, ValueError):
    """A .weights file that does not fit the network (or cannot be a .weights file at all)."""


class WeightsWarning(UserWarning):
    """A .weights file that loads but is suspicious (NaN/Inf values)."""


def format_location(file: Optional[str], line: Optional[int], section: Optional[str] = None,
                    key: Optional[str] = None) -> str:
    """``file:line: [section] key: `` with the parts that are known."""
    where = ""
    if file is not None:
        where = f"{file}:{line}: " if line is not None else f"{file}: "
    elif line is not None:
        where = f"line {line}: "
    if section:
        where += f"[{section}] "
    if key:
        where += f"{key}: "
    return where
