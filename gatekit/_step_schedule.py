"""What the per-step schedules (temperature, noise, sparsity pressure) share: a step count that
sets their value, and a state that checkpoints resume from."""
from __future__ import annotations

from typing import Any


class StepSchedule:
    """A value that depends only on how many times :meth:`step` was called; subclasses say how it is
    computed and where it is applied (:meth:`_apply`)."""

    count: int

    def step(self) -> float:
        """Advance one step, apply the new value and return it."""
        self.count += 1
        return self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The step count, for a checkpoint."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a checkpoint's step count, and apply that step's value to the model."""
        self.count = int(state["count"])
        self._apply()

    def _apply(self) -> float:
        raise NotImplementedError
