"""The paper's target-free sparsity loss (eq. 4-6)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import GatekitError
from ..gated_model import gates_of
from ._executed import check_forward, executed_channels, executed_layers


def sparsity_loss(model: nn.Module, *, layer: float = 0.0, channel: float = 0.0, reduction: str = "sum",
                  channel_rates: str = "executed") -> Tensor:
    """``layer * sum_l zbar_l^2 + channel * sum_f zbar_f^2`` over the gates of the last forward.

    ``zbar_l`` is the fraction of the batch that executes block ``l``; ``zbar_f`` the fraction that
    executes filter ``f``, counting a filter only where its block runs, since only then it costs MACs.
    The channel term therefore also pushes on each layer gate, with the weight of all the block's
    filters: closing a block removes all their cost at once. In short finetunes this closes layers
    before single filters (measured in tests/test_finetune.py: channel rate = execution rate).
    Squares of batch means, not means of squares: a gate is pushed towards firing less often, yet
    stays free to fire for the inputs that need it.

    ``channel_rates="raw"`` reads eq. 5 literally instead: ``zbar_f`` is the fraction of the batch whose
    channel gate ``f`` fires, whether or not its block runs. The channel term then leaves the layer
    gates to lambda alone and closes filters inside blocks that keep running.

    ``reduction="sum"`` follows eq. 4-5: the gradient on each gate's rate is ``2 * coefficient *
    zbar``, independent of how many gates the model has, so one coefficient means the same pressure
    on a ResNet20 as on a ResNet152 (the loss value does grow with the gate count).
    ``reduction="mean"`` divides each sum by its number of gates, so the value lies in [0, 1].

    Args:
        model: a model returned by :func:`gatekit.convert`, after a forward pass.
        layer: lambda, the weight of the layer term.
        channel: gamma, the weight of the channel term.
        reduction: ``"sum"`` or ``"mean"`` over gates.
        channel_rates: ``"executed"`` (a filter counts only where its block runs) or ``"raw"`` (each
            channel gate's own rate).

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no forward pass yet, or an unknown reduction or channel counting.

    >>> loss = criterion(model(x), y) + sparsity_loss(model, layer=0.05, channel=0.1)  # doctest: +SKIP
    """
    if reduction not in ("sum", "mean"):
        raise GatekitError(f"reduction={reduction!r}: use 'sum' or 'mean'.")
    if channel_rates not in ("executed", "raw"):
        raise GatekitError(
            f"channel_rates={channel_rates!r}: use 'executed' (filters of skipped blocks cost nothing) or 'raw'."
        )
    layer_terms, channel_terms = [], []
    for name, gate in gates_of(model).items():
        check_forward(name, gate)
        if gate.layer_gates is not None:
            layer_terms.append(executed_layers(gate).mean(0, keepdim=True))
        decisions = executed_channels(gate) if channel_rates == "executed" else gate.channel_gates
        if decisions is not None:
            channel_terms.append(decisions.mean(0))
    total = torch.zeros((), device=next(iter(gates_of(model).values())).fc.weight.device)
    for weight, rates in ((layer, layer_terms), (channel, channel_terms)):
        if weight and rates:
            squares = torch.cat(rates).pow(2)
            total = total + weight * (squares.sum() if reduction == "sum" else squares.mean())
    return total


@dataclass
class SparsityLoss:
    """The target-free sparsity loss as an object, to attach at conversion.

    >>> gated = gatekit.convert(model, regularizer=SparsityLoss(layer=0.05, channel=0.1))  # doctest: +SKIP
    """

    layer: float = 0.0
    channel: float = 0.0
    reduction: str = "sum"
    channel_rates: str = "executed"
    pressure: float = 1.0  # fraction of lambda and gamma applied; gatekit.SparsitySchedule ramps it

    def __call__(self, model: nn.Module) -> Tensor:
        return sparsity_loss(model, layer=self.pressure * self.layer, channel=self.pressure * self.channel,
                             reduction=self.reduction, channel_rates=self.channel_rates)
