"""Per-sample MACs of a gated model, from the gate decisions of its last forward."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._nesting import enclosing_blocks, own_branch_macs
from .errors import GatekitError
from .gate import Gate
from .gated_model import gates_of, info_of
from .losses._executed import check_forward, executed_layers
from .macs import BlockCosts


def dynamic_macs(model: nn.Module, costs: BlockCosts | None = None) -> Tensor:
    """Exact conv + linear MACs each sample of the last batch cost, as an int64 tensor [B].

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
    info = info_of(model)
    costs = costs or BlockCosts.from_sites(info.dense_macs, info.sites)
    gates = gates_of(model)
    for name, gate in gates.items():
        check_forward(name, gate, empty_ok=True)
    _check_logits(gates)
    decisions = [executed_layers(gate).detach().round().long() for gate in gates.values()]
    enclosing = enclosing_blocks(info.sites)
    own_macs = own_branch_macs(costs.branch_macs, enclosing)
    total: Tensor | int = costs.dense_macs - sum(own_macs)
    for index, gate in enumerate(gates.values()):
        runs, channel_macs = decisions[index], costs.channel_macs[index]
        if gate.channel_gates is not None:
            active = gate.channel_gates.detach().round().long().sum(1)
            # channel_macs is a sum of terms each proportional to the gated channel count: exact division.
            branch = own_macs[index] - channel_macs + (channel_macs // gate.channels) * active
        else:
            branch = torch.full_like(runs, own_macs[index])
        # A block nested in another's branch, gate included, runs only where the enclosing ones run.
        reached = 1
        for outer in enclosing[index]:
            reached = reached * decisions[outer]
        total = total + reached * (gate.macs + runs * branch)
    return total


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
