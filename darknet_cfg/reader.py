"""Darknet .cfg lexing (``read_cfg`` in darknet's parser.c) and writing.

Darknet's rules, reproduced here:
* every whitespace character of a line is removed before anything else;
* empty lines and lines starting with ``#`` or ``;`` are skipped;
* ``[name]`` starts a new section (sections repeat; order is the network order);
* any other line is ``key=value`` split at the FIRST ``=``;
* when a key occurs twice in a section, the first occurrence wins (darknet's lookup walks the list
  from the start).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

from .errors import DarknetCfgError

_WS = re.compile(r"\s+")


@dataclass
class Option:
    key: str
    value: str
    line: int


@dataclass
class Section:
    """One ``[name]`` block. ``name`` has no brackets; ``options`` keep file order and duplicates.
    ``comment``: a line ``write_cfg`` puts above the section (generated cfgs; never parsed)."""
    name: str
    line: int
    options: List[Option] = field(default_factory=list)
    comment: str = ""

    def get(self, key: str) -> Optional[Option]:
        """First occurrence of ``key`` (Darknet: first duplicate key wins)."""
        for opt in self.options:
            if opt.key == key:
                return opt
        return None

    def values(self) -> Dict[str, str]:
        """key -> value with Darknet's precedence (first occurrence)."""
        out: Dict[str, str] = {}
        for opt in self.options:
            out.setdefault(opt.key, opt.value)
        return out

    def set(self, key: str, value) -> None:
        """Override ``key``: the new value is placed first so that it wins."""
        self.options.insert(0, Option(key, str(value), self.line))


@dataclass
class Cfg:
    sections: List[Section]
    path: str = "<cfg>"
    text: str = ""

    @property
    def net(self) -> Section:
        return self.sections[0]


def parse_cfg_text(text: str, path: str = "<cfg>") -> Cfg:
    sections: List[Section] = []
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark (Windows editors); Darknet would choke on it
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _WS.sub("", raw)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            end = line.find("]")
            name = line[1:end] if end > 0 else line[1:]
            if not name:
                raise DarknetCfgError(f"empty section header {raw.strip()!r}", path, lineno)
            sections.append(Section(name, lineno))
            continue
        eq = line.find("=")
        if eq <= 0:
            raise DarknetCfgError(f"cannot parse line {raw.strip()!r} (expected key=value)", path, lineno)
        if not sections:
            raise DarknetCfgError(f"option {line[:eq]!r} appears before the first [section]",
                                  path, lineno)
        sections[-1].options.append(Option(line[:eq], line[eq + 1:], lineno))
    if not sections:
        raise DarknetCfgError("no sections found: a Darknet cfg starts with [net]", path, 1)
    if sections[0].name not in ("net", "network"):
        raise DarknetCfgError("the first section must be [net] (or [network]), found "
                              f"[{sections[0].name}]", path, sections[0].line)
    return Cfg(sections, path, text)


def read_cfg(source: Union[str, os.PathLike, Cfg]) -> Cfg:
    """Read a cfg from a path (or pass a ``Cfg`` through). A bare name that is not a file but
    is a preset (``yolov4-csp.cfg``, ``yolov4-p6``) reads the generated preset; a file wins."""
    if isinstance(source, Cfg):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):  # a built-in preset name (darknet_cfg.zoo) in place of a file
        from .zoo import preset_text
        text = preset_text(path)
        if text is not None:
            return parse_cfg_text(text, path)
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        hint = ""
        if not os.path.dirname(path) and not os.path.exists(path):
            from .zoo import PRESETS
            hint = f" (nor a built-in preset: {', '.join(PRESETS)})"
        raise DarknetCfgError(f"cannot read cfg: {e.strerror}{hint}", path) from None
    return parse_cfg_text(text, path)


def write_cfg(cfg: Cfg) -> str:
    """Cfg text that parses back to the same sections and effective values.

    Duplicated keys are written once with the value Darknet uses (the first)."""
    lines: List[str] = []
    for i, sec in enumerate(cfg.sections):
        if i:
            lines.append("")
        if sec.comment:
            lines.append(f"# {sec.comment}")
        lines.append(f"[{sec.name}]")
        for key, value in sec.values().items():
            lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def with_net_overrides(cfg: Cfg, **values) -> Cfg:
    """A copy of ``cfg`` whose [net] section has ``values`` (None values ignored) taking precedence."""
    sections = [Section(s.name, s.line, list(s.options)) for s in cfg.sections]
    out = Cfg(sections, cfg.path, cfg.text)
    for key, value in values.items():
        if value is not None:
            out.net.set(key, value)
    return out


def iter_sections(cfg: Cfg) -> Iterable[Section]:
    return iter(cfg.sections[1:])
