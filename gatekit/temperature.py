"""Setting and annealing the Gumbel-sigmoid temperature of every gate."""
from __future__ import annotations

from torch import nn

from ._step_schedule import StepSchedule
from .errors import GatekitError
from .gated_model import gates_of


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set the training-time relaxation temperature of all gates of ``model``.

    Lower temperatures make the straight-through gradient closer to that of the hard decision,
    and noisier. Eval-mode decisions do not depend on it.
    """
    if not temperature > 0:
        raise GatekitError(f"temperature must be positive, got {temperature}.")
    for gate in gates_of(model).values():
        gate.temperature = float(temperature)


class TemperatureSchedule(StepSchedule):
    """Exponential annealing from ``start`` to ``end`` over ``steps`` calls of :meth:`step`.

    >>> schedule = TemperatureSchedule(gated, start=5.0, end=0.5, steps=1000)  # doctest: +SKIP
    >>> for batch in loader: ...; schedule.step()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, start: float = 1.0, end: float = 1.0, steps: int = 1) -> None:
        if not (start > 0 and end > 0 and steps >= 1):
            raise GatekitError("TemperatureSchedule needs start > 0, end > 0 and steps >= 1.")
        self.model, self.start, self.end, self.steps = model, start, end, steps
        self.count = 0
        set_temperature(model, start)

    @property
    def temperature(self) -> float:
        progress = min(self.count, self.steps) / self.steps
        return self.start * (self.end / self.start) ** progress

    def _apply(self) -> float:
        set_temperature(self.model, self.temperature)
        return self.temperature
