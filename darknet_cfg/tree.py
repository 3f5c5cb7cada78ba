"""Darknet's class hierarchy files (``tree=`` in [region]/[softmax], e.g. 9k.tree).

Each line is ``name parent_index``; consecutive lines with the same parent form one softmax
group (darknet's read_tree). The hierarchical softmax normalises within each group."""
from __future__ import annotations

import os
import re
from typing import List, Optional

from .errors import DarknetError


def resolve_tree_path(value: str, cfg_path: str) -> Optional[str]:
    """Darknet opens the path relative to its working folder (``data/9k.tree``); we also look
    beside the cfg, with and without the folder part."""
    cfg_dir = os.path.dirname(os.path.abspath(cfg_path))
    for candidate in (value, os.path.join(cfg_dir, value),
                      os.path.join(cfg_dir, os.path.basename(value))):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_tree_groups(path: str) -> List[int]:
    """Sizes of the consecutive softmax groups, in class order."""
    sizes: List[int] = []
    last = None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.replace("\0", " ").split()
                if not parts:
                    continue
                m = re.match(r"[+-]?\d+", parts[1]) if len(parts) > 1 else None
                if len(parts) > 1 and m is None:
                    raise DarknetError(f"{path}:{lineno}: bad parent index {parts[1]!r}")
                parent = int(m.group(0)) if m else -1
                if parent != last or not sizes:
                    sizes.append(0)
                    last = parent
                sizes[-1] += 1
    except OSError as e:
        raise DarknetError(f"{path}: cannot read class tree: {e.strerror}") from None
    return sizes
