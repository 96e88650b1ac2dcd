"""Ramping the sparsity pressure in, so that a trained network is not asked to lose filters at once."""
from __future__ import annotations

from torch import nn

from ._step_schedule import StepSchedule
from .errors import GatekitError
from .gated_model import info_of
from .noise import linear_progress


class SparsitySchedule(StepSchedule):
    """Ramp the ``pressure`` of the attached regularizers linearly from ``start`` to 1 over ``steps``
    calls of :meth:`step`.

    Pressure 0 asks for nothing to close and 1 for the final setting: ``SparsityLoss`` scales lambda
    and gamma, ``TargetRateLoss`` moves each target from 1 to its value, ``MacBudgetLoss`` its
    budget from 1 (the dense cost) to its value. Losses without a ``pressure`` (batch shaping) stay
    as they are. A finetune from a trained model keeps every filter it was trained with for the
    first steps, and closes them as the pressure grows (docs/howto/finetune.md).

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no attached regularizer has a pressure to ramp, or bad ``steps`` / ``start``.

    >>> schedule = SparsitySchedule(gated, steps=int(0.4 * total_steps))  # doctest: +SKIP
    >>> for batch in loader: ...; schedule.step()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, steps: int, start: float = 0.0) -> None:
        if not (isinstance(steps, int) and steps >= 0) or not (0.0 <= start <= 1.0):
            raise GatekitError(f"SparsitySchedule needs a whole number steps >= 0 and start in [0, 1], got "
                               f"steps={steps!r}, start={start!r}.")
        regularizer = info_of(model).regularizer
        terms = regularizer if isinstance(regularizer, (list, tuple)) else [regularizer]
        self.losses = [term for term in terms if hasattr(term, "pressure")]
        if not self.losses:
            raise GatekitError(
                "SparsitySchedule ramps the loss attached at conversion, and this model has none with a "
                "pressure: convert with `regularizer=gatekit.SparsityLoss(...)`, TargetRateLoss or MacBudgetLoss."
            )
        self.steps, self.start, self.count = steps, start, 0
        self._apply()

    @property
    def pressure(self) -> float:
        return self.start + (1.0 - self.start) * linear_progress(self.count, 0, self.steps)

    def _apply(self) -> float:
        for loss in self.losses:
            loss.pressure = self.pressure
        return self.pressure
