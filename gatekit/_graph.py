"""Small walks over fx graphs that several passes share."""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they read from, directly or not."""
    seen = set(nodes)
    stack = list(seen)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen
