"""Residual blocks nested in another block's branch, and what that means for counting their MACs.

A branch may hold a whole residual block (residual networks of residual networks): that block runs,
gate included, only where every block around it runs, and its layers belong to the enclosing branch
too. Counting MACs must take them once, not once per enclosing block.
"""
from __future__ import annotations

from typing import Sequence

from .blocks import GateSite


def enclosing_blocks(sites: Sequence[GateSite]) -> list[list[int]]:
    """For each site, the indices of the sites whose branch holds it (a residual block nested in
    another block's branch: every conv of its branch is one of the enclosing branch's)."""
    layers = [set(site.branch_layers) for site in sites]
    return [
        [outer for outer in range(len(sites)) if outer != inner and layers[inner] < layers[outer]]
        for inner in range(len(sites))
    ]


def own_branch_macs(branch_macs: Sequence[int], enclosing: list[list[int]]) -> list[int]:
    """Each branch's MACs less those of the blocks nested directly in it, which count on their own.

    The channel gate's layers are never inside a nested block: the channel chain stops at a value
    with several users, and a block input has two (branch and shortcut).
    """
    own = list(branch_macs)
    for inner, outers in enumerate(enclosing):
        if outers:  # the innermost encloser has the most enclosers itself
            direct = max(outers, key=lambda outer: len(enclosing[outer]))
            own[direct] -= branch_macs[inner]
    return own
