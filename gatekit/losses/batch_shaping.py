"""The batch-shaping loss (Bejnordi, Blankevoort and Welling, ICLR 2020): gates that fire conditionally.

A gate that is on for half of all inputs may be on *for every input* with probability one half: a
coin flip, not a decision. Batch shaping matches each gate's distribution of probabilities over a
batch to a Beta prior with most mass near 0 and 1, so a gate is either on or off for a given input,
and which of the two depends on the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import GatekitError
from ..gated_model import gates_of
from ._beta import beta_cdf, check_shape_parameters
from ._executed import check_forward, open_probabilities


def batch_shaping_loss(model: nn.Module, *, weight: float = 1.0, alpha: float = 0.6, beta: float = 0.4) -> Tensor:
    """``weight * mean_gates mean_i (F(x_(i)) - i / (B + 1))^2`` over the gates of the last forward.

    For each gate (each channel of a channel head, and each layer head) the probabilities
    ``p = sigmoid(logit)`` of the batch are sorted, ``x_(1) <= ... <= x_(B)``; ``i / (B + 1)`` is their
    empirical CDF and ``F`` the CDF of a Beta(alpha, beta) prior. The gradient moves each sorted
    probability by the Beta pdf, towards where the prior puts its ``i``-th quantile.

    Args:
        model: a model returned by :func:`gatekit.convert`, after a forward pass on a batch of two or
            more samples.
        weight: multiplies the mean over gates.
        alpha: first shape parameter of the prior; the paper's default Beta(0.6, 0.4) has mean 0.6
            and most of its mass near 0 and 1.
        beta: second shape parameter of the prior.

    Returns:
        A scalar tensor.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no forward pass yet, a batch of one sample, or a non-positive shape parameter.

    >>> loss = criterion(gated(x), y) + batch_shaping_loss(gated, weight=0.75)  # doctest: +SKIP
    """
    check_shape_parameters(alpha, beta)
    probabilities = torch.cat(_gate_columns(model), dim=1)
    batch = probabilities.shape[0]
    if batch < 2:
        raise GatekitError(
            "batch shaping matches each gate's distribution over the batch to a prior, so it needs a "
            "batch of at least two samples; the last forward had one."
        )
    ordered, _ = torch.sort(probabilities, dim=0)
    empirical = torch.arange(1, batch + 1, dtype=ordered.dtype, device=ordered.device) / (batch + 1)
    squared_errors = (beta_cdf(ordered, alpha, beta) - empirical.unsqueeze(1)) ** 2
    return weight * squared_errors.mean(0).mean()


def _gate_columns(model: nn.Module) -> list[Tensor]:
    """Open probabilities of every gate of the last forward, one column per gate, each [B, n]."""
    columns = []
    for name, gate in gates_of(model).items():
        check_forward(name, gate)
        channel, layer = open_probabilities(gate)
        if channel is not None:
            columns.append(channel)
        if layer is not None:
            columns.append(layer.unsqueeze(1))
    return columns


@dataclass
class BatchShapingLoss:
    """The batch-shaping loss as an object, to attach at conversion.

    >>> gated = gatekit.convert(resnet, regularizer=BatchShapingLoss(weight=0.75))  # doctest: +SKIP
    """

    weight: float = 1.0
    alpha: float = 0.6
    beta: float = 0.4

    def __post_init__(self) -> None:
        check_shape_parameters(self.alpha, self.beta)

    def __call__(self, model: nn.Module) -> Tensor:
        return batch_shaping_loss(model, weight=self.weight, alpha=self.alpha, beta=self.beta)
