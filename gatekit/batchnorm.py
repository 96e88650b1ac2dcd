"""Re-estimating batch-norm statistics after gating: the gates change what every later layer sees."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import GatekitError
from ._batches import as_batches, split_batch


def recalibrate_batchnorm(
    model: nn.Module, data: Tensor | Dataset | Iterable, *, max_batches: int | None = None, batch_size: int = 128
) -> int:
    """Re-estimate every batch norm's running statistics on ``data``, with the gates deciding as in eval.

    Finetuning with gates updates running means and variances under *training* decisions (sampled,
    noisy), and a closed filter or skipped block shifts the statistics of every layer after it; the
    deployed model then normalizes with statistics of a network it is not. Each batch norm's
    running statistics are reset and recomputed as a cumulative average over the batches (the
    model's own train/eval flags, the batch norms' momenta and everything else are restored after).
    After noise-free training (:func:`gatekit.set_noise` 0) the statistics already belong to the
    deployed network; there it did not pay in the CIFAR-10 ablation (docs/results.md).

    Args:
        model: any model with batch norms, gated or not; it is updated in place.
        data: training inputs: a tensor, a dataset of inputs or ``(input, label)`` pairs, or an
            iterable of such batches (a DataLoader). Augmented training batches are fine.
        max_batches: stop after this many batches.
        batch_size: batch size when ``data`` is a tensor or a dataset.

    Returns:
        The number of samples the statistics were computed on.

    Raises:
        GatekitError: the model has no batch norm that tracks running statistics, or ``data`` held no
            sample.

    >>> gatekit.recalibrate_batchnorm(gated, train_loader, max_batches=32)  # doctest: +SKIP
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise GatekitError(
            f"{type(model).__name__} has no batch norm with running statistics to recalibrate; leave "
            f"out the recalibration step for this model."
        )
    if max_batches is not None and not (isinstance(max_batches, int) and max_batches >= 1):
        raise GatekitError(f"max_batches={max_batches!r}: give a whole number >= 1, or None for all of data.")
    device = next(iter(model.parameters())).device
    modes = {module: module.training for module in model.modules()}
    saved = {norm: _norm_state(norm) for norm in norms}
    samples = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every batch weighs the same
            norm.train()
        with torch.no_grad():
            for index, batch in enumerate(as_batches(data, batch_size)):
                if max_batches is not None and index >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                if inputs.shape[0] == 0:
                    continue
                model(inputs.to(device))
                samples += inputs.shape[0]
        if samples == 0:
            raise GatekitError(
                "recalibrate_batchnorm got no sample: give a non-empty tensor, dataset or loader of training inputs."
            )
    except BaseException:
        for norm, state in saved.items():  # statistics of no sample are worse than the old ones
            norm.running_mean.copy_(state["running_mean"])
            norm.running_var.copy_(state["running_var"])
            norm.num_batches_tracked.copy_(state["num_batches_tracked"])
        raise
    finally:
        for norm, state in saved.items():
            norm.momentum = state["momentum"]
        for module, training in modes.items():
            module.training = training
    return samples


def _norm_state(norm: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return dict(momentum=norm.momentum, running_mean=norm.running_mean.clone(), running_var=norm.running_var.clone(),
                num_batches_tracked=norm.num_batches_tracked.clone())
