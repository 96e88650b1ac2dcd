"""The gate module of one residual block, and the two functions that apply its decisions.

Structure (paper Fig. 2): global average pool -> Linear(C, 16) -> ReLU -> a channel head with one
logit per filter of the block's first conv, and a layer head with one logit for the whole block.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._fused_gate import ALL_ON, PENDING, build_pending_records, eval_forward
from .errors import GatekitError
from .relaxation import gumbel_sigmoid, threshold, top_k, top_k_sigmoid


def _record(name: str) -> property:
    """A property for one of a gate's records of its last forward: built first where pending."""

    def read(gate: Gate) -> Tensor | None:
        if PENDING in gate.__dict__:
            build_pending_records(gate)
        return gate.__dict__.get(name)

    def write(gate: Gate, value: Tensor | None) -> None:
        if PENDING in gate.__dict__:  # the other records stay those of the last forward
            build_pending_records(gate)
        gate.__dict__[name] = value

    # Kept in the instance dict under their own names, as gates pickled before they were properties keep them.
    return property(read, write, doc=f"``{name}`` of the last forward, or None.")


class Gate(nn.Module):
    """Per-sample channel and layer decisions for one residual block.

    Heads start with zero weights and a positive bias, so a fresh gate is on for every input in eval
    mode (the converted model computes what the original did) and on with probability
    ``sigmoid(init_bias)`` under training noise.

    With ``keep`` (``gatekit.convert(..., channel_keep=...)``) the channel head keeps exactly
    ``keep`` filters per input, those with the largest logits (FBS-style top-k), in training and in
    eval; the layer head is unchanged.

    The decisions and logits of the last forward are kept on the module (``layer_gates``,
    ``channel_gates``, ``layer_logits``, ``channel_logits``) for the sparsity losses and statistics.
    In eval mode without autograd they are built when first read.
    """

    keep: int | None = None  # also what a gate pickled before top-k existed reads

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        channel_head: bool = True,
        layer_head: bool = True,
        hidden: int = 16,
        temperature: float = 1.0,
        init_bias: float = 3.0,
        keep: int | None = None,
    ) -> None:
        super().__init__()
        if not (channel_head or layer_head):
            raise GatekitError("a Gate needs a channel head, a layer head or both.")
        if keep is not None and not (channel_head and 1 <= keep <= channels):
            raise GatekitError(
                f"keep={keep!r}: a top-k gate keeps between 1 and its {channels} filters, and needs a channel head."
            )
        self.in_channels, self.channels = in_channels, channels
        self.fc = nn.Linear(in_channels, hidden)
        self.channel_head = nn.Linear(hidden, channels) if channel_head else None
        self.layer_head = nn.Linear(hidden, 1) if layer_head else None
        for head in (self.channel_head, self.layer_head):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.constant_(head.bias, init_bias)
        self.keep = keep  # filters kept per input by top-k, or None: each filter decided on its own
        self.temperature = temperature
        self.noise = 1.0  # scale of the training noise; gatekit.NoiseSchedule anneals it
        self.layer_logits: Tensor | None = None
        self.channel_logits: Tensor | None = None
        self.layer_gates: Tensor | None = None
        self.channel_gates: Tensor | None = None

    def _decide(self, logits: Tensor) -> Tensor:
        return gumbel_sigmoid(logits, self.temperature, noise=self.noise) if self.training else threshold(logits)

    def _decide_channels(self, logits: Tensor) -> Tensor:
        if self.keep is None:
            return self._decide(logits)
        if self.training:
            return top_k_sigmoid(logits, self.keep, self.temperature, noise=self.noise)
        return top_k(logits, self.keep)

    def forward(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Return ``(channel_gates [B, channels] or None, layer_gates [B] or None)``, each 0 or 1."""
        if not self.training and not _exporting(x):  # the same decisions and records, fewer operator calls
            return eval_forward(self, x)
        self.__dict__.pop(PENDING, None)
        pooled = x.flatten(2).mean(dim=2)
        hidden = torch.relu(self.fc(pooled))
        self.channel_logits = self.channel_gates = self.layer_logits = self.layer_gates = None
        if self.channel_head is not None:
            self.channel_logits = self.channel_head(hidden)
            self.channel_gates = self._decide_channels(self.channel_logits)
        if self.layer_head is not None:
            self.layer_logits = self.layer_head(hidden).squeeze(1)
            self.layer_gates = self._decide(self.layer_logits)
        return self.channel_gates, self.layer_gates

    @property
    def macs(self) -> int:
        """Per-sample MACs of the gate's linear layers (pooling is not counted, as elsewhere)."""
        return sum(
            layer.in_features * layer.out_features
            for layer in (self.fc, self.channel_head, self.layer_head)
            if layer is not None
        )

    def __getstate__(self) -> dict:
        # The last forward's records carry autograd history, which deepcopy and pickle refuse
        # ("Only Tensors created explicitly by the user ... support the deepcopy protocol"): a copy
        # of a model in training (an EMA or best-so-far copy) starts without them, as if fresh.
        state = self.__dict__.copy()
        state.update(layer_logits=None, channel_logits=None, layer_gates=None, channel_gates=None)
        state.pop("_gatekit_fused", None)  # a cache of the weights, rebuilt on first use
        state.pop(PENDING, None)
        return state

    def extra_repr(self) -> str:
        keep = "" if self.keep is None else f", keep={self.keep}"
        return f"temperature={self.temperature}, noise={self.noise}{keep}"

    layer_logits = _record("layer_logits")
    channel_logits = _record("channel_logits")
    layer_gates = _record("layer_gates")
    channel_gates = _record("channel_gates")


def _exporting(x: Tensor) -> bool:
    """Tracers and compilers take the plain path: the fused one keeps host-side caches they cannot follow.

    ``torch.export`` and the dynamo ONNX exporter pass tensor subclasses (fake or functional
    tensors) and the TorchScript exporter traces, so both exporters are caught without
    ``torch.onnx.is_in_onnx_export()``, which costs about 1 µs a call (it imports two modules).
    """
    return type(x) is not Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling()


@fx.wrap
def apply_channel_gate(x: Tensor, gates: Tensor, channel_dim: int = 1) -> Tensor:
    """Multiply channel ``c`` of sample ``b`` by ``gates[b, c]``; channels are dimension 1 of an
    N, C, ... tensor, or with ``channel_dim=-1`` the last one (a linear layer's features)."""
    if _all_on(gates):
        return x
    if channel_dim == 1:
        return x * gates.view(gates.shape + (1,) * (x.dim() - 2))
    return x * gates.view(gates.shape[:1] + (1,) * (x.dim() - 2) + gates.shape[1:])


@fx.wrap
def apply_layer_gate(x: Tensor, gates: Tensor) -> Tensor:
    """Multiply sample ``b`` of a residual branch by ``gates[b]``."""
    if _all_on(gates):
        return x
    return x * gates.view(gates.shape + (1,) * (x.dim() - 1))


def _all_on(gates: Tensor) -> bool:
    """Whether the no-grad eval path found every one of ``gates`` on (then ``x * gates`` is ``x``).
    Tracers pass proxies, whose attributes are proxies too: only a plain tensor is asked."""
    return type(gates) is Tensor and getattr(gates, ALL_ON, False)
