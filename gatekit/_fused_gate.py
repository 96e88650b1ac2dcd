"""A gate's eval-mode logits in three ops: pool, hidden layer, and both heads as one matrix product.

``Gate.forward`` calls the channel head and the layer head as two modules and stores four records on
itself through ``nn.Module.__setattr__``; at batch 1 that costs more than its arithmetic (61 µs
against 15 µs on ResNet20's first block, docs/sparse.md). The joined heads are kept until a head's
weights change, checked the way :class:`gatekit._sliced.WeightCache` checks (storage and version).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._sliced import stamp_of
from .gate import Gate


class FusedGate:
    """The eval-mode logits of ``gate``: ``[B, channels]`` then, with a layer head, ``[B, 1]`` joined.

    Shares the gate's parameters; the joined head is rebuilt when one of them changes.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        heads = [head for head in (gate.channel_head, gate.layer_head) if head is not None]
        self._heads: list[dict[str, Tensor]] = [head._parameters for head in heads]
        self._fc = gate.fc._parameters
        self._stamp: tuple[tuple[int, int], ...] = ()
        self._joined: tuple[Tensor, Tensor] | None = None

    def logits(self, x: Tensor) -> Tensor:
        """Channel logits, then the layer logit, per sample: what ``Gate.forward`` computes in eval
        mode before thresholding, in one pooling and two matrix products."""
        pooled = x.flatten(2).mean(2)
        hidden = F.linear(pooled, self._fc["weight"], self._fc["bias"]).relu_()
        # F.linear, not addmv (2 µs faster at batch 1): FlopCounterMode has no formula for addmv, and
        # the tests count the sparse model's MACs with it.
        return F.linear(hidden, *self._joined_heads())

    def _joined_heads(self) -> tuple[Tensor, Tensor]:
        if len(self._heads) == 1:  # one head: its own tensors, nothing to join or keep
            return self._heads[0]["weight"], self._heads[0]["bias"]
        tensors = [head[name] for head in self._heads for name in ("weight", "bias")]
        stamp = stamp_of(tensors)
        if stamp != self._stamp or self._joined is None:
            with torch.no_grad():
                self._joined = (torch.cat(tensors[0::2]), torch.cat(tensors[1::2]))
            self._stamp = stamp
        return self._joined



def eval_forward(gate: Gate, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """What ``Gate.forward`` returns and records in eval mode, through the gate's :class:`FusedGate`.

    The records are set in the instance dict: ``nn.Module.__setattr__`` checks its parameter,
    buffer and module dicts on every assignment, and a plain tensor attribute ends up there anyway.
    """
    fused = gate.__dict__.get("_gatekit_fused")
    if fused is None or fused.gate is not gate:  # a copy of a gate carries its original's
        fused = gate.__dict__["_gatekit_fused"] = FusedGate(gate)
    logits = fused.logits(x)
    decisions = (logits > 0).to(logits.dtype)
    split = gate.channels if gate.channel_head is not None else 0
    records = dict(channel_logits=None, channel_gates=None, layer_logits=None, layer_gates=None)
    if gate.channel_head is not None:
        records.update(channel_logits=logits[:, :split], channel_gates=decisions[:, :split])
    if gate.layer_head is not None:
        records.update(layer_logits=logits[:, split], layer_gates=decisions[:, split])
    gate.__dict__.update(records)
    return records["channel_gates"], records["layer_gates"]
