"""Knowledge distillation from the model that was converted: a free, exact teacher."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn
from torch.nn import functional

from .convert import convert
from .errors import GatekitError, NotConvertedError
from .gated_model import gates_of, info_of, unwrapped


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

    With ``features > 0`` it adds a feature term at every gated block's input (the output of the
    block before it): the mean over blocks of ``||s - t||^2 / ||t||^2``, the student's and the
    teacher's activations, times ``features``. The student's are recorded by a forward pre-hook on
    each of its gates while the student trains (``remove()`` takes the hooks off); the teacher's by
    the same hooks on a copy of the teacher converted with the student's options, gates open, which
    computes what the teacher computes. Measured on CIFAR-10 it did not pay over the logit term
    (docs/results.md), so the recipe leaves it off.

    Args:
        teacher: the trained model, in eval mode.
        temperature: softens both distributions; 4 is the common choice for CIFAR.
        weight: multiplies the term.
        features: weight of the feature term; 0 (the default) leaves it off.
        student: the gated model being trained; needed for the feature term only.

    Raises:
        GatekitError: bad ``temperature``, ``weight`` or ``features``, or ``features`` without a gated
            ``student``; at call time a teacher in training mode, or on another device than the inputs,
            logits of another shape than the student's, or no student features recorded since the
            last call.

    >>> distill = gatekit.DistillationLoss(resnet.eval(), temperature=4.0, weight=0.7)  # doctest: +SKIP
    >>> logits = gated(images)  # doctest: +SKIP
    >>> loss = 0.3 * cross_entropy(logits, labels) + distill(logits, images) + gatekit.gate_loss(gated)  # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        weight: float = 1.0,
        features: float = 0.0,
        student: nn.Module | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise GatekitError(f"DistillationLoss needs the trained model as teacher, got {type(teacher).__name__}.")
        for name, value in (("temperature", temperature), ("weight", weight)):
            if isinstance(value, bool) or not (isinstance(value, Real) and math.isfinite(value) and value > 0):
                raise GatekitError(f"DistillationLoss {name}={value!r}: give a positive number.")
        if isinstance(features, bool) or not (isinstance(features, Real) and math.isfinite(features) and features >= 0):
            raise GatekitError(f"DistillationLoss features={features!r}: give the feature term's weight, 0 or more.")
        self.teacher, self.temperature, self.weight = teacher, float(temperature), float(weight)
        self.features = float(features)
        self._feature_teacher: nn.Module | None = None
        self._student_features: dict[str, Tensor] = {}
        self._teacher_features: dict[str, Tensor] = {}
        self._hooks: list = []
        if self.features:
            self._hook_student(student)

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
            if self._feature_teacher is None:
                return teacher(inputs)
            self._teacher_features.clear()
            return self._feature_teacher.to(device)(inputs)

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
        loss = self.weight * temperature**2 * divergence
        if self.features:
            loss = loss + self.features * self._feature_term()
        return loss

    def remove(self) -> None:
        """Take the feature term's hooks off the student's gates."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _hook_student(self, student: nn.Module | None) -> None:
        if student is None:
            raise GatekitError("DistillationLoss(features=...) needs `student=`, the gated model being trained.")
        try:
            info = info_of(student)
        except NotConvertedError:
            raise GatekitError(
                "DistillationLoss(student=...) must be the model from `gatekit.convert`: the feature term "
                "reads its gated blocks' inputs."
            ) from None
        teacher = unwrapped(self.teacher)
        try:
            info_of(teacher)
            feature_teacher = teacher  # already gated: its gates are the user's to keep open
        except NotConvertedError:
            example = torch.zeros(info.input_shape, device=next(teacher.parameters()).device)
            options = {k: v for k, v in info.options.items() if k != "channel_keep"}  # layer gates only
            feature_teacher = convert(teacher, example_input=example, **{**options, "gates": "layer"}).eval()
        if list(gates_of(feature_teacher)) != list(gates_of(student)):
            raise GatekitError(
                "the teacher's gated blocks differ from the student's, so their features cannot be paired: "
                "pass `teacher=gatekit.convert(model, <the student's options>).eval()`."
            )
        self._feature_teacher = feature_teacher

        def recorder(store: dict[str, Tensor], name: str, always: bool):
            def record(gate: nn.Module, inputs: tuple[Tensor, ...]) -> None:
                if always or gate.training:  # a copy of the student in eval (an EMA) does not overwrite
                    store[name] = inputs[0]
            return record

        for name, gate in gates_of(student).items():
            self._hooks.append(gate.register_forward_pre_hook(recorder(self._student_features, name, False)))
        for name, gate in gates_of(feature_teacher).items():
            self._hooks.append(gate.register_forward_pre_hook(recorder(self._teacher_features, name, True)))

    def _feature_term(self) -> Tensor:
        student, teacher = self._student_features, self._teacher_features
        if set(student) != set(teacher):
            raise GatekitError(
                "no student features were recorded for this batch: call the loss after a training-mode "
                "forward of the `student` passed to DistillationLoss, once per forward."
            )
        terms = [
            (student[name].float() - teacher[name].float()).pow(2).sum() / teacher[name].float().pow(2).sum().clamp_min(1e-12)
            for name in teacher
        ]
        student.clear()
        return torch.stack(terms).mean()
