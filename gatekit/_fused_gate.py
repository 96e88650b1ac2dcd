"""A gate's eval-mode decisions in six operator calls: pool, hidden layer, both heads in one product, threshold.

``Gate.forward`` calls the channel head and the layer head as two modules and stores four records on
itself through ``nn.Module.__setattr__``; at batch 1 that costs more than its arithmetic (53 µs
against 12 µs on ResNet20's first block, docs/sparse.md). Sparse blocks use :class:`FusedGate`;
:func:`eval_forward` is the same computation with the records ``Gate.forward`` keeps, for the gated
model in eval mode.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._sliced import stamp_of
from .relaxation import threshold, top_k

if TYPE_CHECKING:  # gate.py may import this module for its eval-mode forward
    from .gate import Gate


class FusedGate:
    """The eval-mode logits of ``gate``: ``[B, channels]`` then, with a layer head, ``[B, 1]`` joined.

    Six calls from Python (sum and divide, matrix product, ReLU, matrix product, compare), 19
    operator calls inside ATen, against 63 for the ``Gate`` module: in a whole network each costs
    about 6 µs at batch 1, twice what it costs in a microbenchmark loop (docs/sparse.md). Shares the
    gate's parameters; the transposed and joined weights are rebuilt when one of them changes.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        heads = [head for head in (gate.channel_head, gate.layer_head) if head is not None]
        self._sources: list[dict[str, Tensor]] = [gate.fc._parameters] + [head._parameters for head in heads]
        self._stamp: tuple[tuple[int, int], ...] = ()
        self._weights: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._zero = torch.zeros(())
        self._divisor, self._positions = torch.ones(()), 1

    def logits(self, x: Tensor) -> Tensor:
        """Channel logits, then the layer logit, per sample: what ``Gate.forward`` computes in eval
        mode before thresholding."""
        pooled = self._pool(x)
        fc_bias, fc_weight_t, heads_bias, heads_weight_t = self._prepared()
        # addmm, not addmv (2 µs faster still at batch 1): FlopCounterMode has no formula for addmv,
        # and the tests count the sparse model's MACs with it.
        return torch.addmm(heads_bias, torch.addmm(fc_bias, pooled, fc_weight_t).relu_(), heads_weight_t)

    def _pool(self, x: Tensor) -> Tensor:
        """Gate's ``x.flatten(2).mean(2)``, bit for bit. In float32 as a sum divided by a cached
        tensor: ATen's mean is that same sum and division, but it divides by a Python number, which
        it first makes a tensor (nine operator calls instead of four). Half precision sums in float
        inside mean, so it keeps mean."""
        if x.dtype != torch.float32 or x.dim() not in _SPATIAL:
            return x.flatten(2).mean(2)
        positions = math.prod(x.shape[2:])
        divisor = self._divisor
        if self._positions != positions or divisor.device != x.device:
            divisor = self._divisor = torch.tensor(float(positions), device=x.device)
            self._positions = positions
        return x.sum(_SPATIAL[x.dim()]).div_(divisor)

    def decisions(self, x: Tensor) -> Tensor:
        """Eval-mode decisions as a bool tensor shaped like :meth:`logits`: a gate is on when its
        logit is positive (``gatekit.relaxation.threshold``), a top-k channel gate on its ``keep``
        largest channel logits (``gatekit.relaxation.top_k``)."""
        logits = self.logits(x)
        zero = self._zero
        if zero.dtype != logits.dtype or zero.device != logits.device:
            zero = self._zero = logits.new_zeros(())
        # Against a zero tensor, not the number 0: a Python scalar is first made a tensor, four more
        # operator calls (to, _to_copy, empty_strided, copy_) at every block.
        decisions = torch.gt(logits, zero)
        gate = self.gate
        if gate.keep is not None and gate.channel_head is not None:
            channels = gate.channels
            decisions[:, :channels] = top_k(logits[:, :channels], gate.keep).bool()
        return decisions

    def _prepared(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tensors = [layer[name] for layer in self._sources for name in ("weight", "bias")]
        stamp = stamp_of(tensors)
        if stamp != self._stamp or self._weights is None:
            with torch.no_grad():
                heads_weight = torch.cat(tensors[2::2]) if len(tensors) > 4 else tensors[2]
                heads_bias = torch.cat(tensors[3::2]) if len(tensors) > 4 else tensors[3]
                self._weights = (tensors[1], tensors[0].t(), heads_bias, heads_weight.t())
            self._stamp = stamp
        return self._weights


_SPATIAL = {3: (2,), 4: (2, 3), 5: (2, 3, 4)}


def eval_forward(gate: Gate, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """What ``Gate.forward`` returns and records in eval mode, through the gate's :class:`FusedGate`.

    The records are set in the instance dict: ``nn.Module.__setattr__`` checks its parameter,
    buffer and module dicts on every assignment, and a plain tensor attribute ends up there anyway.
    """
    fused = gate.__dict__.get("_gatekit_fused")
    if fused is None or fused.gate is not gate:  # a copy of a gate carries its original's
        fused = gate.__dict__["_gatekit_fused"] = FusedGate(gate)
    logits = fused.logits(x)
    decisions = threshold(logits)
    split = gate.channels if gate.channel_head is not None else 0
    records = dict(channel_logits=None, channel_gates=None, layer_logits=None, layer_gates=None)
    if gate.channel_head is not None:
        channel_logits = logits[:, :split]
        channel_gates = decisions[:, :split] if gate.keep is None else top_k(channel_logits, gate.keep)
        records.update(channel_logits=channel_logits, channel_gates=channel_gates)
    if gate.layer_head is not None:
        records.update(layer_logits=logits[:, split], layer_gates=decisions[:, split])
    gate.__dict__.update(records)
    return records["channel_gates"], records["layer_gates"]
