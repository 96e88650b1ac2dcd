"""A loss that steers the expected compute of a gated model towards a fraction of the dense model's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from torch import Tensor, nn

from .._nesting import enclosing_blocks, own_branch_macs
from ..errors import GatekitError
from ..gated_model import gates_of, info_of
from ..macs import BlockCosts
from ._executed import check_forward, empty_batch_error, open_probabilities


def expected_macs(model: nn.Module, costs: BlockCosts | None = None) -> Tensor:
    """Per-sample MACs the last batch is expected to cost, differentiable in the gate logits.

    A gate is on with probability ``p = sigmoid(logit)`` under the training noise, so a block with
    site ``s`` and gate ``g`` is expected to cost ``g.macs + p_layer * ((s.branch_macs -
    s.channel_macs) + s.channel_macs * mean_c p_channel)``; everything outside the gated branches
    costs what it did in the dense model. With gates saturated at 0 or 1 it equals
    :func:`gatekit.dynamic_macs.dynamic_macs`.

    Args:
        model: a model returned by :func:`gatekit.convert`, after a forward pass.
        costs: block costs at another input size (:func:`gatekit.macs.measure_costs`); by default
            those measured at the conversion's example input (``model.gatekit.input_shape``).

    Returns:
        A float tensor of shape [B], the gates' own MACs included. With every gate open it equals
        ``model.gatekit.dense_macs`` plus the gates' MACs.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no forward pass yet.

    >>> logits = gated(images)  # doctest: +SKIP
    >>> expected_macs(gated).mean() / gated.gatekit.dense_macs  # doctest: +SKIP
    tensor(0.6132, grad_fn=<DivBackward0>)
    """
    info = info_of(model)
    costs = costs or BlockCosts.from_sites(info.dense_macs, info.sites)
    # A block nested in another's branch counts its own layers once, and only where the enclosing
    # blocks run (their decisions are independent, so the probabilities multiply): as dynamic_macs.
    enclosing = enclosing_blocks(info.sites)
    own_macs = own_branch_macs(costs.branch_macs, enclosing)
    total = costs.dense_macs - sum(own_macs)
    gates = gates_of(model)
    layer_probabilities = []
    for name, gate in gates.items():
        check_forward(name, gate, empty_ok=True)
        layer = open_probabilities(gate)[1]
        layer_probabilities.append(layer if layer is not None else 1.0)
    for index, gate in enumerate(gates.values()):
        channel_probabilities = open_probabilities(gate)[0]
        channel_fraction = channel_probabilities.mean(1) if channel_probabilities is not None else 1.0
        channel_macs = costs.channel_macs[index]
        fixed_branch_macs = own_macs[index] - channel_macs
        reached = 1.0
        for outer in enclosing[index]:
            reached = reached * layer_probabilities[outer]
        branch = fixed_branch_macs + channel_macs * channel_fraction
        total = total + reached * (gate.macs + layer_probabilities[index] * branch)
    return total


def mac_budget_loss(model: nn.Module, *, budget: float, weight: float = 1.0) -> Tensor:
    """``weight * (mean_b expected_macs / dense_macs - budget)^2`` on the gates of the last forward.

    Unlike the sparsity losses this weighs every gate by what it saves: closing a filter of an early,
    high-resolution conv counts for more than one of a late conv. It is an expected cost, from gate
    probabilities rather than sampled decisions, so it has a low-variance gradient.

    Args:
        model: a model returned by :func:`gatekit.convert`, after a forward pass.
        budget: the target cost as a fraction of ``model.gatekit.dense_macs``, in (0, 1]. It includes
            the gates' own MACs, and costs are those at the conversion's example input (see
            :func:`expected_macs`).
        weight: multiplies the squared deviation.

    Returns:
        A scalar tensor.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: ``budget`` outside (0, 1], or no forward pass yet.

    >>> loss = criterion(gated(x), y) + mac_budget_loss(gated, budget=0.5, weight=10.0)  # doctest: +SKIP
    """
    check_budget(budget)
    expected = expected_macs(model)
    if expected.numel() == 0:
        raise empty_batch_error()
    fraction = expected.mean() / info_of(model).dense_macs
    return weight * (fraction - budget) ** 2


def check_budget(budget: object) -> None:
    """Raise GatekitError unless ``budget`` is a number in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, Real) or not (
        math.isfinite(budget) and 0 < budget <= 1
    ):
        raise GatekitError(
            f"budget={budget!r}: give the target cost as a fraction of the dense model's MACs, in (0, 1]."
        )


@dataclass
class MacBudgetLoss:
    """The MAC-budget loss as an object, to attach at conversion.

    >>> gated = gatekit.convert(resnet, regularizer=MacBudgetLoss(budget=0.5, weight=10.0))  # doctest: +SKIP
    """

    budget: float
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_budget(self.budget)

    def __call__(self, model: nn.Module) -> Tensor:
        return mac_budget_loss(model, budget=self.budget, weight=self.weight)
