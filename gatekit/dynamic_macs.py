"""Per-sample MACs of a gated model, from the gate decisions of its last forward."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .gated_model import gates_of, info_of
from .losses._executed import check_forward, executed_layers
from .macs import BlockCosts


def dynamic_macs(model: nn.Module, costs: BlockCosts | None = None) -> Tensor:
    """Exact conv + linear MACs each sample of the last batch cost, as an int64 tensor [B].

    A skipped block costs only its gate; a block running ``k`` of its ``N'`` gated filters costs its
    first conv, the depthwise convs after it and its consumer conv times ``k / N'``, plus the rest of
    its branch unchanged. Stem, shortcuts and head always run; every gate's own MACs always count.

    Args:
        model: a gated model after a forward pass.
        costs: costs at the input size of that forward; by default those measured at conversion
            (``model.gatekit.input_shape``). :func:`gatekit.macs.measure_costs` gives others.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: the model has not run since conversion.
    """
    info = info_of(model)
    costs = costs or BlockCosts.from_sites(info.dense_macs, info.sites)
    total: Tensor | int = costs.dense_macs - sum(costs.branch_macs)
    for index, (name, gate) in enumerate(gates_of(model).items()):
        check_forward(name, gate)
        runs = executed_layers(gate).detach().round().long()
        branch_macs, channel_macs = costs.branch_macs[index], costs.channel_macs[index]
        if gate.channel_gates is not None:
            active = gate.channel_gates.detach().round().long().sum(1)
            # channel_macs is a sum of terms each proportional to the gated channel count: exact division.
            branch = branch_macs - channel_macs + (channel_macs // gate.channels) * active
        else:
            branch = torch.full_like(runs, branch_macs)
        total = total + gate.macs + runs * branch
    return total
