"""Knowledge distillation from the model that was converted: a free, exact teacher."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn
from torch.nn import functional

from .errors import GatekitError
from .gated_model import unwrapped


class DistillationLoss:
    """``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, Hinton et al.'s soft-target term.

    Hold the original model as the teacher: ``gatekit.convert`` copies it, so the model you pass
    stays what you trained. The teacher is never trained or changed here: each call runs it under
    ``torch.no_grad`` on the same inputs (one teacher forward per step, about a third of a training
    step's cost), and it lives outside the gated model, so it is in no ``state_dict``,
    ``gatekit.save`` checkpoint or :func:`gatekit.param_groups`. It must be in eval mode (dropout
    and batch-norm updates would make it a moving target) and on the inputs' device. Under DDP each
    process keeps its own teacher; wrap only the gated model.

    Add it to the task loss; the recipe (docs/howto/finetune.md) uses ``weight=0.7`` with the task
    loss scaled by ``0.3``, as Hinton et al.

    Args:
        teacher: the trained model, in eval mode.
        temperature: softens both distributions; 4 is the common choice for CIFAR.
        weight: multiplies the term.

    Raises:
        GatekitError: bad ``temperature`` or ``weight``; at call time a teacher in training mode, or on
            another device than the inputs, or logits of another shape than the student's.

    >>> distill = gatekit.DistillationLoss(resnet.eval(), temperature=4.0, weight=0.7)  # doctest: +SKIP
    >>> logits = gated(images)  # doctest: +SKIP
    >>> loss = 0.3 * cross_entropy(logits, labels) + distill(logits, images) + gatekit.gate_loss(gated)  # doctest: +SKIP
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, weight: float = 1.0) -> None:
        if not isinstance(teacher, nn.Module):
            raise GatekitError(f"DistillationLoss needs the trained model as teacher, got {type(teacher).__name__}.")
        for name, value in (("temperature", temperature), ("weight", weight)):
            if isinstance(value, bool) or not (isinstance(value, Real) and math.isfinite(value) and value > 0):
                raise GatekitError(f"DistillationLoss {name}={value!r}: give a positive number.")
        self.teacher, self.temperature, self.weight = teacher, float(temperature), float(weight)

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """The teacher's logits for ``inputs``, without gradient."""
        teacher = unwrapped(self.teacher)
        if any(module.training for module in teacher.modules()):
            raise GatekitError(
                "the distillation teacher is in training mode: its dropout and batch-norm updates would "
                "change it every step. Call `teacher.eval()` once before training."
            )
        device = next(iter(teacher.parameters()), torch.empty(0, device=inputs.device)).device
        if device != inputs.device:
            raise GatekitError(
                f"the distillation teacher is on {device} and the inputs on {inputs.device}: move it with "
                f"`teacher.to({str(inputs.device)!r})`."
            )
        with torch.no_grad():
            return teacher(inputs)

    def __call__(self, student_logits: Tensor, inputs: Tensor) -> Tensor:
        """The distillation term for a batch: the student's logits and the inputs that produced them."""
        teacher_logits = self.teacher_logits(inputs)
        if teacher_logits.shape != student_logits.shape:
            raise GatekitError(
                f"the teacher's logits have shape {tuple(teacher_logits.shape)} and the student's "
                f"{tuple(student_logits.shape)}: distill from the model that was converted."
            )
        temperature = self.temperature
        log_student = functional.log_softmax(student_logits.float() / temperature, dim=1)
        log_teacher = functional.log_softmax(teacher_logits.float() / temperature, dim=1)
        divergence = functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        return self.weight * temperature**2 * divergence
