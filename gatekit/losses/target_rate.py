"""ConvNet-AIG's target-rate loss (paper eq. 2): each block is pulled towards a chosen execution rate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import GatekitError
from ..gated_model import gates_of, info_of
from ._executed import check_forward

Target = Union[float, Sequence[float], Mapping[str, float]]


def target_rate_loss(model: nn.Module, *, target: Target, weight: float = 1.0) -> Tensor:
    """``weight * sum_l (zbar_l - t_l)^2`` over the layer gates of the last forward.

    ``zbar_l`` is the fraction of the batch whose layer gate opened block ``l``. In training mode the
    gates are straight-through samples, so the loss has a gradient; in eval mode they are hard
    thresholds and it has none. ConvNet-AIG found per-block targets worked best (1 for the first and
    last blocks, lower in the middle), hence the sequence and mapping forms.

    Args:
        model: a model returned by :func:`gatekit.convert` with layer gates, after a forward pass.
        target: the execution rate in [0, 1] for every block; or one rate per block in graph order
            (``[site.name for site in model.gatekit.sites]``); or a mapping from every block name
            to its rate.
        weight: multiplies the whole sum.

    Returns:
        A scalar tensor.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: the model has no layer gates, no forward pass yet, a target outside [0, 1],
            a sequence of the wrong length, or a mapping whose names differ from the blocks'.

    >>> gated = gatekit.convert(resnet, gates="layer")  # doctest: +SKIP
    >>> loss = criterion(gated(x), y) + target_rate_loss(gated, target=0.6)  # doctest: +SKIP
    """
    mode = info_of(model).mode
    if "layer" not in mode:
        raise GatekitError(
            f"the target-rate loss needs layer gates, but this model was converted with "
            f"gates={mode!r}: convert with gates='layer' or gates='channel+layer'."
        )
    gates = gates_of(model)
    targets = block_targets(target, list(gates))
    rates = []
    for name, gate in gates.items():
        check_forward(name, gate)
        rates.append(gate.layer_gates.mean())
    rates_tensor = torch.stack(rates)
    goals = torch.tensor([targets[name] for name in gates], dtype=rates_tensor.dtype, device=rates_tensor.device)
    return weight * (rates_tensor - goals).pow(2).sum()


def block_targets(target: Target, names: list[str]) -> dict[str, float]:
    """Spread ``target`` over the block ``names``, checking every rate lies in [0, 1].

    Raises:
        GatekitError: a rate outside [0, 1], a sequence whose length is not ``len(names)``, or a
            mapping whose keys are not exactly ``names``.
    """
    if isinstance(target, Mapping):
        unknown = [name for name in target if name not in names]
        missing = [name for name in names if name not in target]
        if unknown or missing:
            problem = f"unknown blocks {unknown}" if unknown else f"no target for blocks {missing}"
            raise GatekitError(
                f"target mapping has {problem}; give one rate for each of the blocks: {', '.join(names)}."
            )
        targets = {name: target[name] for name in names}
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) != len(names):
            raise GatekitError(
                f"got {len(target)} target rates, expected {len(names)}: one per gated block, in the "
                f"order of model.gatekit.sites ({', '.join(names)})."
            )
        targets = dict(zip(names, target))
    else:
        targets = dict.fromkeys(names, target)
    for name, rate in targets.items():
        check_rate(rate, f"target for block '{name}'")
    return {name: float(rate) for name, rate in targets.items()}


def check_rate(rate: object, what: str) -> None:
    """Raise GatekitError unless ``rate`` is a real number in [0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, Real) or not (math.isfinite(rate) and 0 <= rate <= 1):
        raise GatekitError(f"{what} is {rate!r}; an execution rate must be a number in [0, 1].")


@dataclass
class TargetRateLoss:
    """The target-rate loss as an object, to attach at conversion.

    Target values are checked here; block names and counts when the loss first sees the model.

    >>> gated = gatekit.convert(resnet, gates="layer", regularizer=TargetRateLoss(target=0.6))  # doctest: +SKIP
    """

    target: Target
    weight: float = 1.0
    pressure: float = 1.0  # fraction of the way from rate 1 to the target; gatekit.SparsitySchedule ramps it

    def __post_init__(self) -> None:
        if isinstance(self.target, Mapping):
            rates = ((f"block '{name}'", rate) for name, rate in self.target.items())
        elif isinstance(self.target, Sequence) and not isinstance(self.target, str):
            rates = ((f"block {index}", rate) for index, rate in enumerate(self.target))
        else:
            rates = (("every block", self.target),)
        for name, rate in rates:
            check_rate(rate, f"target for {name}")

    def __call__(self, model: nn.Module) -> Tensor:
        target = self.target
        if self.pressure != 1.0:
            final = block_targets(target, list(gates_of(model)))
            target = {name: 1.0 - self.pressure * (1.0 - rate) for name, rate in final.items()}
        return target_rate_loss(model, target=target, weight=self.weight)
