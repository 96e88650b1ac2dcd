"""Residual adds gatekit cannot gate soundly, why, and how convert reports them.

A gate is sound when closing it removes the whole branch and nothing else: the branch must start
from one tensor (the gate reads it), read nothing but that tensor, and hand its values to nothing
but the residual add. Multi-branch fusion stages (HRNet) break the last two: a branch value also
feeds another resolution. Such an add is left as it is, and ``convert`` gates the rest.

Sizes are not values: a branch may read a size computed outside it (a stage's height and width,
without the batch dimension), the rest of the network may read sizes the branch computes from its
input's shape, and an assert on a branch value goes with the branch (gatekit/_metadata.py,
gatekit/_graph.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch.fx as fx

from ._graph import CHECKS, ancestors, checks_on, hanging_from
from ._metadata import batch_free_sizes, input_metadata
from ._sites import GateSite, _Ancestry, _Candidate
from .errors import NoResidualBlockError, SkippedBlocksWarning, UngatableBlockError


@dataclass(frozen=True)
class SkippedSite:
    """A residual add that gatekit leaves ungated, and why.

    ``name`` follows the rule of :class:`gatekit.GateSite` names (what ``include``/``exclude``
    match); ``add_node`` is the fx node of the add, ``node`` the one the ``reason`` is about;
    ``kind`` is one of :data:`KINDS`, the reason in a few words.
    """

    name: str
    add_node: str
    node: str
    kind: str
    reason: str


TUPLE_INPUT = "no tensor input"
SHARED_VALUE = "branch and shortcut share a value"
FUSION = "fusion of parallel paths"
USED_OUTSIDE = "branch value used outside the branch"
SHARED_LAYER = "gated layer shared with another block"
INTERNAL = "gatekit failed analysing it"
KINDS = (TUPLE_INPUT, SHARED_VALUE, FUSION, USED_OUTSIDE, SHARED_LAYER, INTERNAL)


@dataclass(frozen=True)
class GraphFacts:
    """What the analysis of every candidate reads about the whole graph, found once."""

    needed: set[fx.Node]  # the output's ancestors: a user that only a check (or nothing) needs keeps no branch running
    sizes: set[fx.Node]  # sizes and numbers without the batch dimension (gatekit/_metadata.py)

    @classmethod
    def of(cls, graph: fx.Graph) -> GraphFacts:
        return cls(ancestors(n for n in graph.nodes if n.op == "output"), batch_free_sizes(graph))


def why_not_gated(
    graph_module: fx.GraphModule, ancestry: _Ancestry, candidate: _Candidate, facts: GraphFacts
) -> tuple[fx.Node, str, str] | None:
    """(the node, one of :data:`KINDS`, the reason) that keeps a candidate block from being gated soundly, or None."""
    branch, shortcut, block_input = candidate.branch, candidate.shortcut, candidate.block_input
    in_order = ancestry.order.__getitem__
    if block_input is None:
        return candidate.add, TUPLE_INPUT, "its branch and shortcut meet only at a tuple of tensors, not at one tensor a gate can read"
    shared = branch & shortcut
    if shared:
        node = min(shared, key=in_order)
        return node, SHARED_VALUE, f"the branch and the shortcut share the value '{node.name}'"
    for node in sorted(branch | shortcut, key=in_order):
        for parent in node.all_input_nodes:
            outside = parent is not block_input and parent not in branch and parent not in shortcut
            if outside and parent not in facts.sizes and _reads_data(ancestry, parent):
                return node, FUSION, (
                    f"'{node.name}' also reads '{parent.name}', which does not come from the block input "
                    f"'{block_input.name}': a fusion of parallel paths, not a residual block"
                    + ("" if _is_tensor(parent) else _BATCH_SIZE)
                )
    ordered = sorted(branch, key=in_order)
    # The block input's shape is there whether the branch runs or not: others may read it too.
    free = input_metadata(ordered, block_input, facts.sizes)
    for node in ordered:
        for user in node.users:
            if user is not candidate.add and user not in branch and user in facts.needed and node not in free:
                return node, USED_OUTSIDE, (
                    f"the branch value '{node.name}' is also used outside the branch (by '{user.name}'), "
                    f"so closing the gate would not skip the branch"
                )
    return _unsound_side_effect(ancestry, candidate, facts)


def _reads_data(ancestry: _Ancestry, node: fx.Node) -> bool:
    """Whether ``node`` depends on the model's input (not only on parameters and constants)."""
    return node.op == "placeholder" or any(a.op == "placeholder" for a in ancestry(node))


# Why a number computed outside the block (not a tensor) counts as a fusion.
_BATCH_SIZE = (
    " (a number that involves the batch size: sparse execution runs the branch on the samples that "
    "execute it, so a branch may read sizes from outside only without the batch dimension)"
)


def _has_side_effect(node: fx.Node) -> bool:
    """An impure call (fx's list), or a method that writes into a tensor (``x[0] = v``, ``x.add_(1)``),
    which fx does not count as impure."""
    if node.op == "call_method":
        return node.target == "__setitem__" or (node.target.endswith("_") and not node.target.startswith("_"))
    return node.op in ("call_function", "call_module") and node.is_impure()


def _is_tensor(node: fx.Node) -> bool:
    return hasattr(node.meta.get("tensor_meta"), "shape")


def _unsound_side_effect(ancestry: _Ancestry, candidate: _Candidate, facts: GraphFacts) -> tuple[fx.Node, str, str] | None:
    """A side effect on branch values that cannot be skipped with the branch, or None.

    What reads the branch without the output needing it goes with the branch when the gate closes
    (sparse execution moves it into the skipped part). An assert on a branch value and the shape
    reads before it (SK-ResNet's ``_assert(x.shape[1] == self.num_paths)``) check nothing when the
    branch does not run; any other side effect, or a check that also reads a value from outside
    the branch, would be lost or would keep the branch running.
    """
    branch, in_order = candidate.branch, ancestry.order.__getitem__
    checks = checks_on(branch, facts.needed)
    for node in sorted(hanging_from(branch, facts.needed), key=in_order):
        if _has_side_effect(node) and node.target not in CHECKS:
            return node, USED_OUTSIDE, (
                f"'{node.name}' reads a branch value for a side effect other than a check, which closing "
                f"the gate would skip"
            )
    for node in sorted(checks, key=in_order):
        for parent in node.all_input_nodes:
            outside = parent not in branch and parent not in checks and parent is not candidate.block_input
            if outside and parent not in facts.sizes and _reads_data(ancestry, parent):
                return node, USED_OUTSIDE, (
                    f"the check '{node.name}' on the branch also reads '{parent.name}' from outside it, so "
                    f"it cannot be skipped with the branch"
                )
    return None


def one_gate_per_layer(sites: Sequence[GateSite]) -> dict[str, tuple[str, str]]:
    """The sites to leave ungated because another site gates the same layers: name -> (node, reason).

    Nested adds do this: a re-parameterisable block (MobileOne, FastViT, GhostNetV3) sums parallel
    branches, ``scale(x) + conv0(x) + conv1(x) + ...``, so each partial sum is a residual add whose
    branch holds the ones before it, and all of them pick the same first conv. Two channel gates
    cannot both slice one layer: sparse execution would slice it twice. The site with the larger
    branch keeps its gate (its layer gate skips more, and its branch holds the other's layer).
    """
    order = {site.name: index for index, site in enumerate(sites)}
    claimed: dict[str, str] = {}
    losers: dict[str, tuple[str, str]] = {}
    for site in sorted(sites, key=lambda s: (-s.branch_macs, -order[s.name])):  # ties: the later add, outside
        layers = {node for node, _ in site.sliced_layers} | {site.channel_gate_node}
        shared = sorted(node for node in layers if node in claimed)
        if shared:
            owner = claimed[shared[0]]
            losers[site.name] = (shared[0], (
                f"block '{owner}', whose branch holds this one's gated layer '{site.first_conv}', already "
                f"slices '{shared[0]}' for its own channel gate: a layer takes one channel gate"
            ))
        else:
            claimed.update(dict.fromkeys(layers, site.name))
    return losers


def describe(skipped: Sequence[SkippedSite]) -> str:
    """One line per kind of reason naming every site it holds, then the first site's full reason."""
    lines = []
    for kind in KINDS:
        sites = [site for site in skipped if site.kind == kind]
        if sites:
            lines.append(f"  {kind} ({len(sites)}): {', '.join(site.name for site in sites)}")
            lines.append(f"    e.g. {sites[0].name}: {sites[0].reason}")
    return "\n".join(lines)


def report_skipped(model_name: str, gated: int, skipped: Sequence[SkippedSite], *, strict: bool) -> None:
    """Warn once about the sites convert leaves ungated, or raise when ``strict`` or none is left.

    Raises:
        UngatableBlockError: ``strict`` and some site cannot be gated.
        NoResidualBlockError: no site can be gated at all.
    """
    if not skipped:
        return
    if strict:
        raise UngatableBlockError(
            f"{len(skipped)} residual block(s) of {model_name} cannot be gated:\n{describe(skipped)}\n"
            f"Hint: drop strict=True to gate the other blocks and leave these as they are, or "
            f"exclude them (`exclude=[{skipped[0].name!r}, ...]`)."
        )
    if gated == 0:
        raise NoResidualBlockError(
            f"{model_name} has residual adds, but none can be gated:\n{describe(skipped)}\n"
            f"Hint: gatekit gates a block whose branch starts from one tensor and feeds only its add."
        )
    warnings.warn(
        f"gatekit left {len(skipped)} residual block(s) of {model_name} ungated and gated the other "
        f"{gated}:\n{describe(skipped)}\n`gatekit.gate_sites(model, skipped=True)` lists them; "
        f"`convert(..., strict=True)` refuses instead.",
        SkippedBlocksWarning, stacklevel=3,
    )
