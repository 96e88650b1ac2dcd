"""The regularizer chosen at conversion, computed with one call in the training loop."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from ..errors import GatekitError
from ..gated_model import info_of


def gate_loss(model: nn.Module) -> Tensor:
    """Compute the regularizer(s) given to ``gatekit.convert(..., regularizer=...)`` on the last forward.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no regularizer was attached at conversion.

    >>> gated = gatekit.convert(resnet, regularizer=gatekit.SparsityLoss(layer=0.05, channel=0.1))  # doctest: +SKIP
    >>> loss = criterion(gated(images), labels) + gatekit.gate_loss(gated)  # doctest: +SKIP
    """
    regularizer = info_of(model).regularizer
    if regularizer is None or regularizer == []:
        raise GatekitError(
            "no regularizer attached: convert with `regularizer=gatekit.SparsityLoss(layer=..., "
            "channel=...)` (or another gatekit loss), or call that loss directly."
        )
    terms: Sequence[Callable[[nn.Module], Tensor]] = (
        regularizer if isinstance(regularizer, (list, tuple)) else (regularizer,)
    )
    return sum(term(model) for term in terms)
