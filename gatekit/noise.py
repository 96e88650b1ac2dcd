"""Scaling the training noise of every gate, so that training sees the decisions eval makes.

Training samples each decision as ``logit + noise * L > 0`` with logistic ``L``; eval thresholds
``logit > 0``. With logits near ±3 the noise flips about 5 % of the decisions of every sample, so a
model trained with full noise is tuned for a network that is never deployed. At noise 0 the forward
pass makes exactly the eval decisions and the gates still learn through the straight-through
gradient. In the CIFAR-10 ablation (docs/results.md) a warm-started model trained at noise 0 from
the first step matched static pruning; annealing the noise away over the second half recovered only
half of the gap. Cold starts, which must explore, anneal.
"""
from __future__ import annotations

import math

from torch import nn

from ._step_schedule import StepSchedule
from .errors import GatekitError
from .gated_model import gates_of


def set_noise(model: nn.Module, noise: float) -> None:
    """Scale the logistic training noise of every gate of ``model`` (1: the paper's, 0: none).

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: ``noise`` is negative or not finite.

    >>> set_noise(gated, 0.0)  # training now makes the eval-mode decisions  # doctest: +SKIP
    """
    check_noise(noise)
    for gate in gates_of(model).values():
        gate.noise = float(noise)


def check_noise(noise: object) -> None:
    """Raise GatekitError unless ``noise`` is a finite number >= 0."""
    if isinstance(noise, bool) or not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise GatekitError(f"noise={noise!r}: the noise scale must be a finite number >= 0.")


def linear_progress(count: int, delay: int, steps: int) -> float:
    """Fraction of a linear ramp done after ``count`` steps, for a ramp that waits ``delay`` steps
    and then lasts ``steps`` (0 steps: done at once)."""
    if steps <= 0:
        return 1.0 if count >= delay else 0.0
    return min(max((count - delay) / steps, 0.0), 1.0)


class NoiseSchedule(StepSchedule):
    """Linear annealing of the training noise from ``start`` to ``end``: constant for ``delay`` calls
    of :meth:`step`, then over ``steps`` calls.

    For a cold start (every gate open), docs/howto/finetune.md keeps full noise for the first half of
    training and anneals it to 0 over the second half; a warm start trains at noise 0 throughout.

    >>> schedule = NoiseSchedule(gated, delay=total // 2, steps=total - total // 2)  # doctest: +SKIP
    >>> for batch in loader: ...; schedule.step()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, start: float = 1.0, end: float = 0.0, steps: int, delay: int = 0) -> None:
        if not (isinstance(steps, int) and isinstance(delay, int) and steps >= 0 and delay >= 0):
            raise GatekitError(f"NoiseSchedule needs whole numbers steps >= 0 and delay >= 0, got {steps!r}, {delay!r}.")
        check_noise(end)
        self.model, self.start, self.end, self.steps, self.delay = model, start, end, steps, delay
        self.count = 0
        set_noise(model, self.noise)

    @property
    def noise(self) -> float:
        progress = linear_progress(self.count, self.delay, self.steps)
        return self.start + (self.end - self.start) * progress

    def _apply(self) -> float:
        set_noise(self.model, self.noise)
        return self.noise
