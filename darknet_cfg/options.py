"""Typed access to one cfg section, with Darknet's defaults and usage tracking.

Darknet reads numbers with ``atoi``/``atof``: the longest numeric prefix counts and the rest of the
value is ignored (``layers = 180 ###P6`` is 180). We do the same, but a value with no numeric prefix
at all is an error instead of Darknet's silent 0.
"""
from __future__ import annotations

import re
import warnings
from typing import List, Optional, Sequence

from .errors import DarknetCfgError, format_location
from .reader import Option, Section

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|nan)", re.I)


INT_MIN, INT_MAX = -2 ** 31, 2 ** 31 - 1


def _short(text: str, limit: int = 40) -> str:
    """A value for an error message: long ones cut in the middle."""
    return text if len(text) <= limit else f"{text[:20]}...{text[-10:]} ({len(text)} chars)"


class CfgWarning(UserWarning):
    """Something Darknet accepts but that is probably a mistake (unused key, odd values)."""


class Options:
    """The options of one section. Getters mark keys as used; ``unused()`` lists the rest."""

    def __init__(self, section: Section, path: str):
        self.section = section
        self.path = path
        self.used = set()

    @property
    def name(self) -> str:
        return self.section.name

    def _find(self, key: str) -> Optional[Option]:
        opt = self.section.get(key)
        if opt is not None:
            self.used.add(key)
        return opt

    def has(self, key: str) -> bool:
        return self._find(key) is not None

    def error(self, message: str, key: Optional[str] = None) -> DarknetCfgError:
        opt = self.section.get(key) if key else None
        line = opt.line if opt is not None else self.section.line
        return DarknetCfgError(message, self.path, line, self.section.name, key)

    def warn(self, message: str, key: Optional[str] = None) -> None:
        opt = self.section.get(key) if key else None
        line = opt.line if opt is not None else self.section.line
        warnings.warn(format_location(self.path, line, self.section.name, key) + message,
                      CfgWarning, stacklevel=3)

    def _number(self, opt: Option, pattern, conv, text: Optional[str] = None):
        text = opt.value if text is None else text
        m = pattern.match(text)
        if not m:
            raise DarknetCfgError(f"bad number {text!r}", self.path, opt.line,
                                  self.section.name, opt.key)
        digits = m.group(0)
        if conv is int:
            # Darknet reads ints with atoi into a C int: beyond its range the value is undefined
            if len(digits.lstrip("+-")) > 10 or not INT_MIN <= int(digits) <= INT_MAX:
                raise DarknetCfgError(f"{_short(digits)} is out of range (Darknet reads a 32-bit "
                                      f"int: {INT_MIN}..{INT_MAX})", self.path, opt.line,
                                      self.section.name, opt.key)
            return int(digits)
        return conv(digits)

    def int(self, key: str, default: Optional[int] = None) -> int:
        opt = self._find(key)
        if opt is None:
            if default is None:
                raise self.error("required key is missing", key)
            return default
        return self._number(opt, _INT, int)

    def float(self, key: str, default: Optional[float] = None) -> float:
        opt = self._find(key)
        if opt is None:
            if default is None:
                raise self.error("required key is missing", key)
            return default
        return self._number(opt, _FLOAT, float)

    def str(self, key: str, default: Optional[str] = None) -> Optional[str]:
        opt = self._find(key)
        return default if opt is None else opt.value

    def _list(self, key: str, pattern, conv) -> Optional[List]:
        opt = self._find(key)
        if opt is None:
            return None
        text = opt.value.split("#", 1)[0]  # Darknet: anchors/mask parsing stops at '#'
        items = text.split(",")
        if items and items[-1] == "":
            items = items[:-1]  # a trailing comma adds nothing
        out = []
        for item in items:
            if not pattern.match(item):
                raise DarknetCfgError(f"bad number {_short(item)!r} in list "
                                      f"{_short(opt.value)!r}", self.path, opt.line,
                                      self.section.name, key)
            out.append(self._number(opt, pattern, conv, item))
        return out

    def ints(self, key: str, default: Optional[Sequence[int]] = None) -> Optional[List[int]]:
        v = self._list(key, _INT, int)
        return list(default) if v is None and default is not None else v

    def floats(self, key: str, default: Optional[Sequence[float]] = None) -> Optional[List[float]]:
        v = self._list(key, _FLOAT, float)
        return list(default) if v is None and default is not None else v

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.str(key, default)
        if value not in choices:
            raise self.error(f"unknown value {value!r} (expected one of {', '.join(choices)})", key)
        return value

    def unused(self) -> List[Option]:
        seen = set()
        out = []
        for opt in self.section.options:
            if opt.key not in self.used and opt.key not in seen:
                out.append(opt)
            seen.add(opt.key)
        return out

    def warn_unused(self) -> None:
        for opt in self.unused():
            warnings.warn(format_location(self.path, opt.line, self.section.name, opt.key)
                          + "unused key", CfgWarning, stacklevel=2)
