"""A gate's eval-mode decisions in as few operator calls as possible: pool, hidden layer, both heads
in one product, threshold.

``Gate.forward`` calls the channel head and the layer head as two modules and stores four records on
itself through ``nn.Module.__setattr__``; at batch 1 that costs more than its arithmetic (53 µs
against 12 µs on ResNet20's first block, docs/sparse.md). Sparse blocks use :class:`FusedGate`;
:func:`eval_forward` is the same computation with the records ``Gate.forward`` keeps, for the gated
model in eval mode.

Where no gradient is needed, on float32 CPU tensors, the whole gate is one call into a small C
kernel (``gatekit/_gate_kernel.c``, built at install time); elsewhere, and where it was not built,
six torch operator calls compute the same up to float rounding.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from ._sliced import stamp_of
from .relaxation import threshold, top_k

try:
    from . import _gate_kernel
except ImportError:  # installed without a C compiler: the torch operators below do the same work
    _gate_kernel = None

ALL_ON = "gatekit_all_on"  # set on decision tensors whose every entry is 1: applying them changes nothing
# Looked up once: each call below runs at every gate of every forward.
_grad_enabled, _FLOAT32 = torch.is_grad_enabled, torch.float32
_dispatch_modes, _function_modes = torch._C._len_torch_dispatch_stack, torch._C._is_torch_function_mode_enabled
PENDING = "_gatekit_pending"  # a gate's kernel logits whose records are not built yet (see eval_forward)


class GateLayers(Protocol):
    """What this module reads of a :class:`gatekit.Gate`: described here rather than imported, as
    gate.py imports this module for its eval-mode forward."""

    fc: nn.Linear
    channel_head: nn.Linear | None
    layer_head: nn.Linear | None
    channels: int
    keep: int | None


def kernel_available() -> bool:
    """Whether the C gate kernel was built (``pip install`` with a C compiler)."""
    return _gate_kernel is not None


class FusedGate:
    """The eval-mode logits and decisions of ``gate``: ``[B, channels]`` then, with a layer head,
    ``[B, 1]`` joined.

    Shares the gate's parameters; the joined heads (and their transposes for the torch path) are
    rebuilt when one of them changes.
    """

    def __init__(self, gate: GateLayers) -> None:
        self.gate = gate
        # The parameter dicts of fc, the channel head and the layer head ({} for a missing head).
        self._layers: list[dict[str, Tensor]] = [gate.fc._parameters] + [
            {} if head is None else head._parameters for head in (gate.channel_head, gate.layer_head)
        ]
        self._stamp: list[tuple[int, int]] = []
        self._weights: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._zero = torch.zeros(())
        self._divisor, self._positions = torch.ones(()), 1
        # The C kernel reads the parameters themselves, so in-place edits need no cache check.
        self._kernel_pointers: list[int] = []  # the parameters' data pointers, as last checked
        self._kernel_usable = False
        self._uniform: dict[tuple[bool, int, int], Tensor] = {}  # (on, batch, width): see uniform_decisions
        self.in_features, self.hidden = gate.fc.in_features, gate.fc.out_features
        self.channels = gate.channels if gate.channel_head is not None else 0
        self.layered = gate.layer_head is not None

    def logits(self, x: Tensor) -> Tensor:
        """Channel logits, then the layer logit, per sample: what ``Gate.forward`` computes in eval
        mode before thresholding. Torch operators only: differentiable, and seen by dispatch modes."""
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

    def decision_bytes(self, x: Tensor) -> bytes:
        """:meth:`decisions` on the host: one byte per decision (1 = on), row-major ``[B, outputs]``."""
        if self.gate.keep is None and (arguments := self.kernel_arguments(x)) is not None:
            return _gate_kernel.decide(*arguments)[1]
        bits = self.decisions(x)
        return (bits if bits.is_cpu else bits.cpu()).numpy().tobytes()

    def kernel_arguments(self, x: Tensor) -> list[int] | None:
        """The C kernel's arguments for ``x`` (data pointers, then sizes) where it may compute this
        gate on ``x``, else None.

        Not under autograd (the kernel has no backward) nor under a dispatch or function mode
        (``FlopCounterMode`` must see the gate's matrix products); float32 CPU tensors of the gate's
        width, contiguous or channels last, only (another width takes the torch path, which raises
        the usual error).
        """
        if (
            _gate_kernel is None or _grad_enabled() or type(x) is not Tensor or x.dtype is not _FLOAT32
            or not x.is_cpu or _dispatch_modes() or _function_modes()
        ):
            return None
        shape = x.shape
        if len(shape) < 3 or shape[1] != self.in_features or not (numel := x.numel()):
            return None
        channels_last = not x.is_contiguous()
        if channels_last and not (len(shape) == 4 and x.is_contiguous(memory_format=torch.channels_last)):
            return None
        fc, channel, layer = self._layers
        parameters = [fc["weight"], fc.get("bias"), channel.get("weight"), channel.get("bias"),
                      layer.get("weight"), layer.get("bias")]
        pointers = [0 if t is None else t.data_ptr() for t in parameters]
        if pointers != self._kernel_pointers:  # a parameter was replaced (moved, cast, `.data` assigned)
            self._kernel_usable = self._readable(parameters)
            self._kernel_pointers = pointers
        if not self._kernel_usable:
            return None
        return [x.data_ptr(), *pointers, shape[0], shape[1], numel // (shape[0] * shape[1]), self.hidden,
                self.channels, channels_last]

    def uniform_decisions(self, batch: int, width: int, on_count: int) -> Tensor | None:
        """Decisions ``[batch, width]`` (``[batch]`` for width 0) when ``on_count`` says they are
        all 1 (marked ``ALL_ON``) or all 0, else None.

        Small ones are shared: reused from call to call until something writes to one (its version
        counter moves), hence made outside inference mode. Large batches get their own, since
        allocating costs little next to their arithmetic and shared ones would stay in memory.
        """
        size = batch * max(width, 1)
        if on_count not in (0, size):
            return None
        key = (on_count == size, batch, width)
        shared = self._uniform.get(key)
        if shared is None or shared._version:
            with torch.inference_mode(False):
                shared = torch.full((batch, width) if width else (batch,), float(key[0]), dtype=torch.float32)
            if key[0]:
                setattr(shared, ALL_ON, True)
            if size > _SHARED_DECISIONS:
                return shared
            if len(self._uniform) >= 8:  # batch sizes come and go: keep the last few
                self._uniform.clear()
            self._uniform[key] = shared
        return shared

    def _readable(self, parameters: list[Tensor | None]) -> bool:
        """Whether the kernel may read ``parameters`` (fc, channel head, layer head; weight then
        bias): contiguous float32 CPU tensors of the shapes it assumes. Anything else, even a
        replacement of another shape, takes the torch path, which raises where shapes disagree."""
        hidden, channels = self.hidden, self.channels
        shapes = [(hidden, self.in_features), (hidden,), (channels, hidden), (channels,), (1, hidden), (1,)]
        return parameters[0] is not None and all(
            t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and tuple(t.shape) == shape)
            for t, shape in zip(parameters, shapes)
        )

    def _prepared(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tensors = [layer[name] for layer in self._layers if layer for name in ("weight", "bias")]
        stamp = stamp_of(tensors)
        if stamp != self._stamp or self._weights is None:
            with torch.no_grad():
                heads_weight = torch.cat(tensors[2::2]) if len(tensors) > 4 else tensors[2]
                heads_bias = torch.cat(tensors[3::2]) if len(tensors) > 4 else tensors[3]
                self._weights = (tensors[1], tensors[0].t(), heads_bias, heads_weight.t())
            self._stamp = stamp
        return self._weights


_SPATIAL = {3: (2,), 4: (2, 3), 5: (2, 3, 4)}
_SHARED_DECISIONS = 4096  # the most decisions a gate keeps in one shared tensor (16 KB)


def eval_forward(gate: GateLayers, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """What ``Gate.forward`` returns and records in eval mode, through the gate's :class:`FusedGate`.

    On the kernel path the records (logits and decisions) are built only when read: a model in eval
    mode is mostly run for its output, and four tensors per gate cost more at batch 1 than the gate's
    arithmetic. Decisions that are the same for the whole batch are returned as shared tensors, so
    a forward whose gates all agree allocates nothing; all-on ones carry ``ALL_ON``, so that applying
    them is skipped. Records are set in the instance dict: ``nn.Module.__setattr__`` checks its
    parameter, buffer and module dicts on every assignment.
    """
    fused = gate.__dict__.get("_gatekit_fused")
    if fused is None or fused.gate is not gate:  # a copy of a gate carries its original's
        fused = gate.__dict__["_gatekit_fused"] = FusedGate(gate)
    arguments = fused.kernel_arguments(x)
    if arguments is None:
        return _records_from_logits(gate, fused.logits(x))
    logits, _, channels_on, layers_on = _gate_kernel.decide(*arguments)
    batch, channels = x.shape[0], fused.channels
    channel_gates = fused.uniform_decisions(batch, channels, channels_on) if channels and gate.keep is None else None
    layer_gates = fused.uniform_decisions(batch, 0, layers_on) if fused.layered else None
    if (channel_gates is not None or not channels) and (layer_gates is not None or not fused.layered):
        gate.__dict__[PENDING] = (logits, batch)
        return channel_gates, layer_gates
    channel_records, layer_records = _records_from_logits(gate, _logits_tensor(logits, batch))
    return (
        channel_records if channel_gates is None else channel_gates,
        layer_records if layer_gates is None else layer_gates,
    )


def build_pending_records(gate: GateLayers) -> None:
    """Build the records of ``gate``'s last kernel forward, if they are still pending."""
    pending = gate.__dict__.pop(PENDING, None)
    if pending is not None:
        _records_from_logits(gate, _logits_tensor(*pending))


def _logits_tensor(logits: bytes, batch: int) -> Tensor:
    # bytearray: torch.frombuffer warns on a read-only buffer, and the records may be written to.
    return torch.frombuffer(bytearray(logits), dtype=torch.float32).view(batch, -1)


def _records_from_logits(gate: GateLayers, logits: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``Gate.forward``'s eval-mode records from the joined logits (channel logits, then the layer
    logit); returns the decisions."""
    decisions = threshold(logits)
    split = gate.channels if gate.channel_head is not None else 0
    records = dict(channel_logits=None, channel_gates=None, layer_logits=None, layer_gates=None)
    if gate.channel_head is not None:
        channel_logits = logits[:, :split]
        channel_gates = decisions[:, :split] if gate.keep is None else top_k(channel_logits, gate.keep)
        records.update(channel_logits=channel_logits, channel_gates=channel_gates)
    if gate.layer_head is not None:
        records.update(layer_logits=logits[:, split], layer_gates=decisions[:, split])
    gate.__dict__.pop(PENDING, None)
    gate.__dict__.update(records)
    return records["channel_gates"], records["layer_gates"]
