"""The exit heads' training loss: cross-entropy and distillation at every exit (Shallow-Deep Networks)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import GatekitError
from ..exit_macs import exit_forward_error
from .._exit_info import exit_policy


def exit_loss(
    model: nn.Module,
    target: Tensor | None,
    *,
    teacher: Tensor | None = None,
    distill: float = 0.5,
    temperature: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """``sum_k w_k [(1 - distill) CE(exit_k, target) + distill T^2 KL(teacher_T || exit_k,T)]`` over the
    exits of the last forward. Add it to the loss of the final logits the model returned.

    Args:
        model: a model with exits (:func:`gatekit.add_exits`), after a forward in training mode.
        target: class labels [B]; may be None when ``distill`` is 1.
        teacher: logits [B, classes] to distill from, on the model's device: a teacher model's, or
            the model's own final logits (detached). None: the final logits of the last forward.
        distill: weight of the distillation term, in [0, 1].
        temperature: distillation temperature T.
        weights: one weight per exit (default: 1 each).

    Raises:
        ExitsError: no exits, or no forward since they were added.
        GatekitError: a teacher on another device or of another shape, labels missing, weights of
            the wrong length, ``distill`` outside [0, 1].

    >>> logits = model(images)  # doctest: +SKIP
    >>> loss = F.cross_entropy(logits, labels) + gatekit.exit_loss(model, labels)  # doctest: +SKIP
    """
    policy = exit_policy(model)
    if policy.exit_logits is None:
        raise exit_forward_error("gatekit.exit_loss")
    exits = policy.exit_logits
    if not 0 <= distill <= 1:
        raise GatekitError(f"distill={distill!r}: give the distillation weight, in [0, 1].")
    weights = [1.0] * len(exits) if weights is None else list(weights)
    if len(weights) != len(exits):
        raise GatekitError(f"{len(weights)} weights for {len(exits)} exits: give one weight per exit.")
    soft = _teacher_logits(policy.final_logits, teacher) if distill else None
    if distill < 1 and target is None:
        raise GatekitError("exit_loss needs the labels (target) unless distill=1.")
    total = exits[0].new_zeros((), dtype=torch.float32)
    for weight, logits in zip(weights, exits):
        logits = logits.float()
        loss = (1 - distill) * nn.functional.cross_entropy(logits, target) if distill < 1 else 0.0
        if soft is not None:
            loss = loss + distill * distillation(logits, soft, temperature)
        total = total + weight * loss
    return total


def distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target term, ``T^2 KL(softmax(teacher / T) || softmax(student / T))``."""
    log_student = torch.log_softmax(student / temperature, -1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, -1)
    return temperature**2 * nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def _teacher_logits(final: Tensor, teacher: Tensor | None) -> Tensor:
    if teacher is None:
        return final.detach()
    if not isinstance(teacher, Tensor):
        raise GatekitError(
            f"teacher must be a tensor of logits, got {type(teacher).__name__}: pass `teacher_model(images)`."
        )
    if teacher.device != final.device:
        raise GatekitError(
            f"the teacher's logits are on {teacher.device}, the model's on {final.device}: move the "
            f"teacher model to the model's device (`teacher.to({str(final.device)!r})`)."
        )
    if teacher.shape != final.shape:
        raise GatekitError(f"teacher logits of shape {tuple(teacher.shape)} for model logits {tuple(final.shape)}.")
    return teacher.detach()
