"""A loss that steers the expected compute of a gated model towards a fraction of the dense model's."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from numbers import Real

import torch
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
    return _cost(model, costs, open_probabilities)


def deployed_macs(model: nn.Module, costs: BlockCosts | None = None) -> Tensor:
    """Per-sample MACs of the last batch under eval-mode decisions (``logit > 0``), without gradient.

    What the deployed model would spend on the last batch of a training forward, whatever the
    training noise sampled; the budget controller of :class:`MacBudgetLoss` steers by it. (Later
    blocks' logits still saw the sampled decisions of earlier blocks.)

    Args:
        model: a model returned by :func:`gatekit.convert`, after a forward pass.
        costs: block costs at another input size; by default those at the conversion's example input.

    Returns:
        A float tensor of shape [B], the gates' own MACs included.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no forward pass yet.

    >>> gated(images)  # doctest: +SKIP
    >>> deployed_macs(gated).mean() / gated.gatekit.dense_macs  # doctest: +SKIP
    tensor(0.5013)
    """
    with torch.no_grad():
        return _cost(model, costs, _thresholded)


def _thresholded(gate) -> tuple[Tensor | None, Tensor | None]:
    return tuple(None if p is None else (p > 0.5).to(p.dtype) for p in open_probabilities(gate))


def _cost(model: nn.Module, costs: BlockCosts | None, probabilities_of) -> Tensor:
    info = info_of(model)
    costs = costs or BlockCosts.from_sites(info.dense_macs, info.sites)
    # A block nested in another's branch counts its own layers once, and only where the enclosing
    # blocks run (their decisions are independent, so the probabilities multiply): as dynamic_macs.
    enclosing = enclosing_blocks(info.sites)
    own_macs = own_branch_macs(costs.branch_macs, enclosing)
    total = costs.dense_macs - sum(own_macs)
    gates = gates_of(model)
    probabilities = []
    for name, gate in gates.items():
        check_forward(name, gate, empty_ok=True)
        probabilities.append(probabilities_of(gate))
    layer_probabilities = [layer if layer is not None else 1.0 for _, layer in probabilities]
    for index, (gate, (channel_probabilities, _)) in enumerate(zip(gates.values(), probabilities)):
        channel_fraction = channel_probabilities.mean(1) if channel_probabilities is not None else 1.0
        channel_macs = costs.channel_macs[index]
        fixed_branch_macs = own_macs[index] - channel_macs
        reached = 1.0
        for outer in enclosing[index]:
            reached = reached * layer_probabilities[outer]
        branch = fixed_branch_macs + channel_macs * channel_fraction
        total = total + reached * (gate.macs + layer_probabilities[index] * branch)
    return total


def mac_budget_loss(model: nn.Module, *, budget: float, weight: float = 20.0) -> Tensor:
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
    fraction = _mean_fraction(expected_macs(model), model)
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
    """The MAC-budget loss as an object, to attach at conversion, with a controller that lands the budget.

    The loss is ``weight * (f - b)^2 + multiplier * f``, ``f`` the expected cost fraction of the batch
    (:func:`expected_macs`, differentiable) and ``b`` the budget: a proportional and an integral
    term. The quadratic term alone settles where its pull balances the task loss's, short of ``b``
    (measured: 70-79 % of the MACs for a 50 % budget at weight 20). So ``multiplier``, a Lagrange
    multiplier, is raised by dual ascent: after each training forward, by ``controller * (d - b)``
    where ``d`` is the cost fraction of the *deployed* (eval-mode) decisions of that batch, and
    lowered at half that rate while ``d`` is under budget, never below 0. Overshoot is pushed back
    until the deployed cost meets the budget; undershoot is left to the task loss, which reopens
    gates that pay. The quadratic term damps the integral one: a large ``controller`` with a small
    ``weight`` overshoots and closes everything (measured: budget 0.25 landed at 1 %).
    ``controller=0`` is the plain quadratic loss.

    Args:
        budget: target cost as a fraction of ``model.gatekit.dense_macs``, in (0, 1], the gates' own
            MACs included, at the conversion's example input size.
        weight: weight of the quadratic term.
        controller: dual-ascent step of the multiplier per training step (0: no controller).
        pressure: fraction of the way from no saving (budget 1) to ``budget``; a
            :class:`gatekit.SparsitySchedule` ramps it from 0 to 1.
        multiplier: the controller's state; store it with a training checkpoint to resume.

    >>> gated = gatekit.convert(resnet, regularizer=MacBudgetLoss(budget=0.5))  # doctest: +SKIP
    """

    budget: float
    weight: float = 20.0
    controller: float = 0.5
    pressure: float = 1.0
    multiplier: float = 0.0

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not (isinstance(self.controller, Real) and math.isfinite(self.controller) and self.controller >= 0):
            raise GatekitError(f"controller={self.controller!r}: give the multiplier's step size, a number >= 0.")
        self._seen: weakref.ref | None = None
        self._multiplier_in_use = self.multiplier

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_seen"] = None  # a weak reference cannot be pickled; a copy starts a fresh forward
        return state

    @property
    def target(self) -> float:
        """The budget in force at the current ``pressure``."""
        return 1.0 - self.pressure * (1.0 - self.budget)

    def __call__(self, model: nn.Module) -> Tensor:
        target = self.target
        fraction = _mean_fraction(expected_macs(model), model)
        if self.controller:
            self._update_multiplier(model, target)
        return self.weight * (fraction - target) ** 2 + self._multiplier_in_use * fraction

    def _update_multiplier(self, model: nn.Module, target: float) -> None:
        gate = next(iter(gates_of(model).values()))
        marker = gate.layer_logits if gate.layer_logits is not None else gate.channel_logits
        if not gate.training or (self._seen is not None and self._seen() is marker):
            return  # once per training forward, however often the loss is evaluated on it
        self._seen = weakref.ref(marker)
        self._multiplier_in_use = self.multiplier
        excess = _mean_fraction(deployed_macs(model), model).item() - target
        self.multiplier = max(0.0, self.multiplier + self.controller * (excess if excess > 0 else 0.5 * excess))


def _mean_fraction(per_sample_macs: Tensor, model: nn.Module) -> Tensor:
    if per_sample_macs.numel() == 0:
        raise empty_batch_error()
    return per_sample_macs.mean() / info_of(model).dense_macs
