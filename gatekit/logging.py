"""Gate statistics as flat records of numbers, over one batch or many, for JSON lines or TensorBoard.

A record is a ``dict[str, float]`` with the mean execution and channel rates over blocks (as
:func:`gatekit.summarize`), the mean dynamic MACs per sample (as :func:`gatekit.dynamic_macs`), the
dense MACs and their ratio, and, unless asked not to, each block's two rates under
``"<block>/execution_rate"`` and ``"<block>/channel_rate"``. Any logger that takes scalars by name
(Lightning's ``log_dict``, Weights & Biases, MLflow) takes it as is.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .dynamic_macs import dynamic_macs
from .errors import GatekitError, MissingDependencyError
from .gated_model import gates_of, info_of
from .losses._executed import check_forward, executed_channels, executed_layers
from .macs import BlockCosts
from .stats import BlockStats, summarize


class GateMeter:
    """Running per-sample totals of gate decisions and dynamic MACs over many forwards.

    Call :meth:`update` after each forward of ``model``; :meth:`compute` returns the record of every
    sample seen since the last :meth:`reset`. Totals stay on the model's device until then, so
    updating does not synchronise a GPU.

    Args:
        model: a gated model from :func:`gatekit.convert`.
        costs: block costs at the input size the model runs on (:func:`gatekit.macs.measure_costs`);
            by default those measured at conversion (``model.gatekit.input_shape``).
        per_block: include each block's rates in the record.

    Raises:
        NotConvertedError: the model has no gates.

    >>> meter = GateMeter(gated)  # doctest: +SKIP
    >>> for images, _ in loader: gated(images); meter.update()  # doctest: +SKIP
    >>> meter.compute()["mean_macs"]  # doctest: +SKIP
    24957894.0
    """

    def __init__(self, model: nn.Module, *, costs: BlockCosts | None = None, per_block: bool = True) -> None:
        info = info_of(model)
        self.model = model
        self.costs = costs or BlockCosts.from_sites(info.dense_macs, info.sites)
        self.per_block = per_block
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self.samples = 0
        self._executions: dict[str, Tensor | float] = {}
        self._channels: dict[str, Tensor | float] = {}
        self._macs: Tensor | float = 0.0

    def update(self) -> None:
        """Add the samples of the model's last forward.

        Raises:
            GatekitError: the model has not run since conversion.
        """
        gates = gates_of(self.model)
        batch = 0
        with torch.no_grad():
            for name, gate in gates.items():
                check_forward(name, gate)
                runs = executed_layers(gate).detach().float()
                channels = executed_channels(gate)
                channel_fraction = channels.detach().float().mean(1) if channels is not None else runs
                self._executions[name] = self._executions.get(name, 0.0) + runs.sum()
                self._channels[name] = self._channels.get(name, 0.0) + channel_fraction.sum()
                batch = runs.shape[0]
            self._macs = self._macs + dynamic_macs(self.model, self.costs).double().sum()
        self.samples += batch

    def compute(self) -> dict[str, float]:
        """The record of every sample since the last reset.

        Raises:
            GatekitError: no sample was added.
        """
        if self.samples == 0:
            raise GatekitError("GateMeter has no samples: call update() after a forward of the model first.")
        stats = {
            name: BlockStats(execution_rate=_item(self._executions[name]) / self.samples,
                             channel_rate=_item(self._channels[name]) / self.samples)
            for name in self._executions
        }
        mean_macs = _item(self._macs) / self.samples
        record = {**summarize(stats), "mean_macs": mean_macs, "dense_macs": float(self.costs.dense_macs),
                  "mac_fraction": mean_macs / self.costs.dense_macs}
        if self.per_block:
            for name, block in stats.items():
                record[f"{name}/execution_rate"] = block.execution_rate
                record[f"{name}/channel_rate"] = block.channel_rate
        return record


def gate_record(model: nn.Module, *, costs: BlockCosts | None = None, per_block: bool = True) -> dict[str, float]:
    """The record of the model's last forward: rates, mean dynamic MACs, per-block rates.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: the model has not run since conversion.

    >>> gated(images)  # doctest: +SKIP
    >>> gate_record(gated, per_block=False)  # doctest: +SKIP
    {'execution_rate': 0.77, 'channel_rate': 0.71, 'mean_macs': 24957894.0, 'dense_macs': 30821248.0, 'mac_fraction': 0.81}
    """
    meter = GateMeter(model, costs=costs, per_block=per_block)
    meter.update()
    return meter.compute()


class JsonLinesWriter:
    """Append one JSON object per :meth:`write` to a file: a log any tool reads line by line.

    >>> log = JsonLinesWriter("runs/gates.jsonl")  # doctest: +SKIP
    >>> log.write(gate_record(gated), epoch=3)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)

    def write(self, record: Mapping[str, float], **fields: Any) -> None:
        """Append ``fields`` (e.g. ``step=``, ``epoch=``), a ``time`` stamp and ``record`` as one line."""
        line = {**fields, "time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")


class TensorBoardWriter:
    """Write records as TensorBoard scalars under ``prefix`` (``gatekit/execution_rate``, ...).

    Args:
        log_dir: where a new ``torch.utils.tensorboard.SummaryWriter`` writes; ignored with ``writer``.
        writer: an existing writer, or anything with ``add_scalar(tag, value, step)``.
        prefix: tag prefix.

    Raises:
        MissingDependencyError: no ``writer`` was given and the tensorboard package is not installed.

    >>> board = TensorBoardWriter("runs/tb")  # doctest: +SKIP
    >>> board.write(gate_record(gated), step=epoch)  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None, prefix: str = "gatekit/") -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MissingDependencyError(
                    "TensorBoardWriter needs the tensorboard package: `pip install 'gatekit[tensorboard]'` "
                    "(or `pip install tensorboard`), or pass `writer=` an object with add_scalar()."
                ) from error
            writer = SummaryWriter(log_dir=None if log_dir is None else os.fspath(log_dir))
        self.writer, self.prefix = writer, prefix

    def write(self, record: Mapping[str, float], step: int) -> None:
        """Add every value of ``record`` as a scalar at ``step``."""
        for name, value in record.items():
            self.writer.add_scalar(self.prefix + name, value, step)

    def close(self) -> None:
        """Flush and close the underlying writer."""
        self.writer.close()


def _item(value: Tensor | float) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)
