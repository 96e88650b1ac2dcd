"""Optimizer parameter groups for finetuning a gated model."""
from __future__ import annotations

from typing import Any

from torch import nn

from .gated_model import gates_of


def param_groups(model: nn.Module, *, weight_decay: float = 5e-4, gate_lr: float | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into the network's (with weight decay) and the gates' (without).

    The paper (section 4.1) applies no weight decay to gate weights or biases: decay would pull the
    gate logits towards zero, i.e. towards coin-flip decisions, fighting the sparsity loss.

    Args:
        model: a model returned by :func:`gatekit.convert`.
        weight_decay: decay of the network's own parameters.
        gate_lr: a learning rate for the gates only; by default the optimizer's.

    Returns:
        Two parameter groups for any ``torch.optim`` optimizer; frozen parameters are left out.

    >>> optimizer = torch.optim.SGD(param_groups(gated), lr=0.1, momentum=0.9, nesterov=True)  # doctest: +SKIP
    """
    gate_params = {id(p) for gate in gates_of(model).values() for p in gate.parameters()}
    network = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_params]
    gates = [p for gate in gates_of(model).values() for p in gate.parameters() if p.requires_grad]
    gate_group: dict[str, Any] = {"params": gates, "weight_decay": 0.0}
    if gate_lr is not None:
        gate_group["lr"] = gate_lr
    return [{"params": network, "weight_decay": weight_decay}, gate_group]
