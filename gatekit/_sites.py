"""What block discovery passes around: the gate sites it finds, the candidate blocks it examines, and
the ancestor sets it finds both with.

Below both :mod:`gatekit.blocks`, which finds the sites, and :mod:`gatekit.skipped_sites`, which says
why a candidate is not one, so that neither imports the other's types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx


@dataclass(frozen=True)
class GateSite:
    """Where one gate goes: a residual block, and the layer of its branch whose filters the channel
    gate turns off (``first_conv``: a conv, or a linear layer in ConvNeXt blocks; chosen as
    docs/design.md says, usually the branch's first conv).

    ``name`` is the dotted path of the module whose forward holds the residual add. Node fields are
    fx node names of the traced model; module fields are dotted module paths. ``branch_macs`` is the
    per-sample cost of the whole branch with every gate open; ``shortcut`` is ``"identity"``,
    ``"projection"`` (holds a conv) or ``"parameter-free"`` (pooling, padding); ``channel_macs`` is the part of it that
    shrinks in proportion to the channels left on (that layer, depthwise convs after it, the two
    layers of a squeeze-excitation on its channels, the consumer).
    ``branch_layers`` and ``scaled_layers`` name the conv/linear nodes behind those two numbers, so
    the costs can be measured again at another input size.
    """

    name: str
    in_channels: int
    channels: int
    first_conv: str
    channelwise_ops: tuple[str, ...]
    consumer: str | None
    shortcut: str
    block_input_node: str
    channel_gate_node: str
    branch_output_node: str
    add_node: str
    branch_macs: int
    channel_macs: int
    branch_layers: tuple[str, ...]
    scaled_layers: tuple[str, ...]
    # How sparse execution slices each layer the gated channels pass: (fx node name, role), role
    # "first" (computes them: output channels), "chain" (per-channel: depthwise conv, norm) or
    # "consumer" (reads them: input channels). A squeeze-excitation on them adds its two layers.
    sliced_layers: tuple[tuple[str, str], ...] = ()
    # Where the gated channels are: dimension 1 (N, C, ...) after a conv, the last one after a linear
    # layer (ConvNeXt's pointwise layers run on channels-last tensors).
    channel_dim: int = 1


class _Ancestry:
    """Ancestor sets of graph nodes, memoised: graphs of a few thousand nodes stay fast."""

    def __init__(self, graph: fx.Graph) -> None:
        self.order = {node: index for index, node in enumerate(graph.nodes)}
        self._ancestors: dict[fx.Node, frozenset[fx.Node]] = {}
        for node in graph.nodes:
            found: set[fx.Node] = set()
            for parent in node.all_input_nodes:
                found.add(parent)
                found |= self._ancestors[parent]
            self._ancestors[node] = frozenset(found)

    def __call__(self, node: fx.Node) -> frozenset[fx.Node]:
        return self._ancestors[node]

    def between(self, start: fx.Node, end: fx.Node) -> set[fx.Node]:
        """Nodes on paths from ``start`` (excluded) to ``end`` (included)."""
        return {n for n in self(end) | {end} if start in self(n)}


@dataclass(frozen=True)
class _Candidate:
    """An add with a block input and a branch holding more convolutions than its shortcut."""

    add: fx.Node
    block_input: fx.Node | None
    branch_output: fx.Node
    branch: set[fx.Node]
    shortcut: set[fx.Node]
