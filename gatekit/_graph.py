"""Small walks over fx graphs that several passes share."""
from __future__ import annotations

from typing import Iterable

import torch
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


# Side effects that only check values (timm's `_assert(x.shape[1] == self.num_paths)`): a check on
# a branch value has nothing left to check when the branch is skipped, so it may go with it.
CHECKS = {torch._assert, torch._assert_async}


def hanging_from(branch: set[fx.Node], needed: set[fx.Node]) -> set[fx.Node]:
    """Nodes outside ``branch`` that read it, directly or not, and that the output does not need
    (``needed``: the output's ancestors)."""
    hanging: set[fx.Node] = set()
    stack = [user for node in branch for user in node.users if user not in branch and user not in needed]
    while stack:  # a user of a node the output does not need is not needed either
        node = stack.pop()
        if node not in hanging:
            hanging.add(node)
            stack.extend(node.users)
    return hanging


def checks_on(branch: set[fx.Node], needed: set[fx.Node]) -> set[fx.Node]:
    """The nodes of :func:`hanging_from` that lead to a side effect: an assert on a branch value,
    with the shape reads and comparisons before it. They run for the branch's sake only."""
    hanging = hanging_from(branch, needed)
    effects = [n for n in hanging if n.op == "call_function" and n.is_impure()]
    return ancestors(effects) & hanging

