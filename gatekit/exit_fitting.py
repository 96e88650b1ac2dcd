"""gatekit.fit_exits: fit the exit heads alone, on a frozen backbone, in minutes on a CPU.

The backbone runs once over the data, in eval mode and without gradients; each head's pooled
input is kept, and only the heads' classifiers are trained on those features. No backbone weight or
batch-norm statistic can move.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._batches import as_batches, split_batch
from .errors import GatekitError
from ._exit_info import exit_heads, exit_policy
from .losses.exit_loss import distillation


@dataclass(frozen=True)
class ExitFit:
    """What :func:`fit_exits` did: the samples it fitted on and each head's accuracy on them
    (name -> fraction; None without labels), after fitting."""

    samples: int
    train_accuracy: dict[str, float | None]


def fit_exits(
    model: nn.Module,
    data: Tensor | Dataset | Iterable,
    *,
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    temperature: float = 1.0,
    epochs: int = 30,
    batch_size: int = 1024,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ExitFit:
    """Train the exit heads of ``model`` in place, every other parameter and buffer untouched.

    Each head learns ``(1 - distill) CE(labels) + distill T^2 KL(teacher || head)`` with Adam and a
    cosine learning rate; the teacher is ``teacher``'s logits, or by default the model's own final
    logits (the heads learn to say early what the model will say at the end).

    Args:
        model: a model with exits (:func:`gatekit.add_exits`).
        data: images, ``(images, labels)`` pairs, a Dataset of them or a DataLoader.
        teacher: a model whose logits to distill from, on the model's device; None: the model itself.
        distill: weight of the distillation term in [0, 1]; labels are needed below 1.
        temperature: distillation temperature.
        epochs: passes over the cached features.
        batch_size: samples per Adam step.
        lr: Adam's initial learning rate (cosine to 0).
        weight_decay: Adam's weight decay.
        seed: seed of the sample order.

    Returns:
        An :class:`ExitFit`.

    Raises:
        ExitsError: the model has no exits.
        GatekitError: empty data, labels missing, a teacher on another device, bad numbers.
    """
    heads = exit_heads(model)
    _check(distill, epochs, batch_size, lr)
    device = next(iter(model.parameters())).device
    if teacher is not None:
        teacher_device = next(iter(teacher.parameters()), torch.empty(0, device=device)).device
        if teacher_device != device:
            raise GatekitError(
                f"the teacher is on {teacher_device}, the model on {device}: move one of them "
                f"(`teacher.to({str(device)!r})`)."
            )
    features, targets, labels = _features(model, heads, data, teacher, device)
    if labels is None and distill < 1:
        raise GatekitError("fit_exits needs labels unless distill=1: give (images, labels) pairs.")
    generator = torch.Generator().manual_seed(seed)
    accuracy = {}
    for (name, head), inputs in zip(heads.items(), features):
        _fit_head(head, inputs, targets, labels, distill, temperature, epochs, batch_size, lr, weight_decay, generator)
        with torch.no_grad():
            predicted = head.classifier(inputs.to(device)).argmax(1).cpu()
        accuracy[name] = None if labels is None else (predicted == labels).float().mean().item()
    return ExitFit(samples=len(targets), train_accuracy=accuracy)


def _check(distill: float, epochs: int, batch_size: int, lr: float) -> None:
    if not 0 <= distill <= 1:
        raise GatekitError(f"distill={distill!r}: give the distillation weight, in [0, 1].")
    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(batch_size, int) and batch_size >= 1):
        raise GatekitError(f"epochs={epochs!r}, batch_size={batch_size!r}: give positive integers.")
    if not lr > 0:
        raise GatekitError(f"lr={lr!r}: give a positive learning rate.")


def _features(model, heads, data, teacher, device) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """Each head's pooled inputs, the teacher's logits and the labels, over the whole data (on CPU)."""
    pooled: list[list[Tensor]] = [[] for _ in heads]
    targets, labels = [], []
    hooks = [
        head.register_forward_pre_hook(lambda _, args, index=index, head=head: pooled[index].append(head.pool(args[0]).cpu()))
        for index, head in enumerate(heads.values())
    ]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in as_batches(data, 500):
                inputs, batch_labels = split_batch(batch)
                inputs = inputs.to(device)
                model(inputs)
                final = exit_policy(model).final_logits if teacher is None else teacher(inputs)
                targets.append(final.float().cpu())
                labels.append(batch_labels)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    if not targets or sum(len(t) for t in targets) == 0:
        raise GatekitError("the data holds no sample: fit_exits needs at least one input.")
    known = None if any(label is None for label in labels) else torch.cat([label.cpu().long() for label in labels])
    return [torch.cat(chunks) for chunks in pooled], torch.cat(targets), known


def _fit_head(head, inputs, targets, labels, distill, temperature, epochs, batch_size, lr, weight_decay, generator) -> None:
    device = next(head.parameters()).device
    optimizer = torch.optim.Adam(head.classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(inputs) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    head.classifier.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            logits = head.classifier(inputs[index].to(device))
            loss = distill * distillation(logits, targets[index].to(device), temperature) if distill else 0.0
            if distill < 1:
                loss = loss + (1 - distill) * nn.functional.cross_entropy(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    head.classifier.eval()
