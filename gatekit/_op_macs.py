"""Measuring the MACs of one call: torch's own FLOP formulas, counted as the call runs.

Shape propagation uses it on what the graph does not show (a leaf module's convolutions, an
einsum's contraction order), so those counts equal ``torch.utils.flop_counter.FlopCounterMode`` / 2
by construction. It is FlopCounterMode's dispatch without its per-module table: entering that
costs milliseconds (hooks on every module), this costs microseconds.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class MacCounter(TorchDispatchMode):
    """Count the MACs of the aten ops run inside it: ``with counting() as counter: ...; counter.macs``."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    @property
    def macs(self) -> int:
        return self.flops // 2

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func not in flop_registry and func._overloadpacket not in flop_registry:
            with self:  # as FlopCounterMode: an op without a formula is counted by its parts
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextmanager
def counting() -> Iterator[MacCounter]:
    """A :class:`MacCounter` for the calls inside. Attention runs on the math kernel, whose matmuls
    torch's formulas count: the fused CPU kernel has no formula (FlopCounterMode counts it as 0)."""
    with sdpa_kernel([SDPBackend.MATH]), MacCounter() as counter:
        yield counter
