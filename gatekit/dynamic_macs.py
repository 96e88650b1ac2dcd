"""Per-sample MACs of a gated model, from the gate decisions of its last forward."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._internal import internal_errors
from ._nesting import enclosing_blocks, own_branch_macs
from .errors import GatekitError
from .gate import Gate
from .gated_model import gates_of, info_of
from .losses._executed import check_forward, executed_layers
from .macs import BlockCosts


def dynamic_macs(model: nn.Module, costs: BlockCosts | None = None) -> Tensor:
    """Exact MACs each sample of the last batch cost (conv, linear, matmul, attention, leaf
    modules: gatekit.macs), as an int64 tensor [B].

    A skipped block costs only its gate; a block running ``k`` of its ``N'`` gated filters costs its
    first conv, the depthwise convs after it and its consumer conv times ``k / N'``, plus the rest of
    its branch unchanged. Stem, shortcuts and head always run; every gate's own MACs count, except
    in a block nested in the branch of a block that was skipped: nothing of it runs.

    Args:
        model: a gated model after a forward pass.
        costs: costs at the input size of that forward; by default those measured at conversion
            (``model.gatekit.input_shape``). :func:`gatekit.macs.measure_costs` gives others.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: the model has not run since conversion, or a gate logit of the last forward
            is NaN (NaN input or weights): a NaN logit reads as a closed gate, so the count would
            be silently too low.
    """
    fixed, blocks = block_macs(model, costs)
    return fixed + sum(blocks)


def block_macs(model: nn.Module, costs: BlockCosts | None = None) -> tuple[int, list[Tensor]]:
    """The parts of :func:`dynamic_macs`: the MACs outside every gated branch, which every sample
    pays, and each gated block's per-sample MACs [B] (its gate, and its branch where it ran), in
    ``model.gatekit.sites`` order. Raises as :func:`dynamic_macs` does."""
    info = info_of(model)
    costs = costs or BlockCosts.from_sites(info.dense_macs, info.sites)
    gates = gates_of(model)
    for name, gate in gates.items():
        check_forward(name, gate, empty_ok=True)
    _check_logits(gates)
    blocks = list(zip(info.sites, gates.values()))
    decisions = []
    for site, gate in blocks:
        with internal_errors("counting dynamic MACs", site.add_node, block=site.name):
            decisions.append(executed_layers(gate).detach().round().long())
    with internal_errors("counting dynamic MACs", "the blocks nested in other blocks' branches"):
        enclosing = enclosing_blocks(info.sites)
        own_macs = own_branch_macs(costs.branch_macs, enclosing)
    per_block = []
    for index, (site, gate) in enumerate(blocks):
        with internal_errors("counting dynamic MACs", site.add_node, block=site.name):
            per_block.append(_block_macs(gate, decisions, enclosing[index], own_macs[index], costs.channel_macs[index], index))
    return costs.dense_macs - sum(own_macs), per_block


def _block_macs(gate: Gate, decisions: list[Tensor], enclosing: list[int], own_macs: int, channel_macs: int, index: int) -> Tensor:
    """What one block cost each sample: its gate where reached, its branch where it ran."""
    runs = decisions[index]
    if gate.channel_gates is not None:
        active = gate.channel_gates.detach().round().long().sum(1)
        # channel_macs is a sum of terms each proportional to the gated channel count: exact division.
        branch = own_macs - channel_macs + (channel_macs // gate.channels) * active
    else:
        branch = torch.full_like(runs, own_macs)
    # A block nested in another's branch, gate included, runs only where the enclosing ones run.
    reached = 1
    for outer in enclosing:
        reached = reached * decisions[outer]
    return reached * (gate.macs + runs * branch)


def _check_logits(gates: dict[str, Gate]) -> None:
    """Raise GatekitError naming the samples and the first block whose gate logits are NaN."""
    for name, gate in gates.items():
        bad = None
        for logits in (gate.channel_logits, gate.layer_logits):
            if logits is not None:
                nan = logits.detach().isnan()
                nan = nan.any(1) if nan.dim() > 1 else nan
                bad = nan if bad is None else bad | nan
        if bad is not None and bool(bad.any()):
            samples = bad.nonzero().flatten().tolist()
            raise GatekitError(
                f"sample(s) {samples[:10]} of the last batch reached block '{name}' with NaN gate "
                f"logits, from NaN or infinite input values or weights. A NaN logit reads as a closed "
                f"gate, so their MACs would be counted too low. Check the data (`torch.isfinite(x).all()`)."
            )
