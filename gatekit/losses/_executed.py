"""What the gates of the last forward executed, as tensors the losses can differentiate."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import GatekitError
from ..gate import Gate
from ..relaxation import top_k


def check_forward(name: str, gate: Gate, *, empty_ok: bool = False) -> None:
    """Raise GatekitError unless the gate has decisions from a forward pass, on at least one sample
    unless ``empty_ok`` (per-sample results such as MAC counts are fine on an empty batch)."""
    if gate.layer_gates is None and gate.channel_gates is None:
        raise GatekitError(
            f"the gate of block '{name}' has no decisions yet: run the model on a batch before "
            f"computing a gatekit loss or statistics."
        )
    if not empty_ok and executed_layers(gate).shape[0] == 0:
        raise empty_batch_error()


def empty_batch_error() -> GatekitError:
    # Means over no sample are NaN: as a loss they would silently turn every weight into NaN.
    return GatekitError(
        "the last forward ran on an empty batch (0 samples): gate losses and statistics are means "
        "over the batch, undefined for none. Skip empty batches (`if len(images) == 0: continue`)."
    )


def executed_layers(gate: Gate) -> Tensor:
    """Per-sample layer decisions, [B]; all ones when the model has no layer gates."""
    if gate.layer_gates is not None:
        return gate.layer_gates
    return gate.channel_gates.new_ones(gate.channel_gates.shape[0])


def executed_channels(gate: Gate) -> Tensor | None:
    """Per-sample channel decisions counted only where the block runs, [B, channels]."""
    if gate.channel_gates is None:
        return None
    return gate.channel_gates * executed_layers(gate).unsqueeze(1)


def open_probabilities(gate: Gate) -> tuple[Tensor | None, Tensor | None]:
    """Noise-free probabilities that each gate is on: (channel [B, C] or None, layer [B] or None).

    Under the logistic noise of training, P(logit + noise > 0) = sigmoid(logit) exactly. A top-k
    channel gate (``gate.keep``) keeps a fixed number of filters whatever its logits: its channel
    "probabilities" are its noise-free decisions, constant, so the expected cost is exact and has no
    gradient to the channel head (only the layer gates move the cost).
    """
    channel = None
    if gate.channel_logits is not None:
        logits = gate.channel_logits
        channel = torch.sigmoid(logits) if gate.keep is None else top_k(logits.detach(), gate.keep)
    layer = torch.sigmoid(gate.layer_logits) if gate.layer_logits is not None else None
    return channel, layer
