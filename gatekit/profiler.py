"""gatekit.profile: what a model really costs per input, and how its gates behave, over a dataset."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._batches import as_batches, split_batch
from .dynamic_macs import dynamic_macs
from ._devices import usable_device
from ._internal import internal_errors
from .errors import GatekitError
from .exit_macs import ExitCosts, exit_macs, measure_exit_costs
from ._exit_info import exit_policy, exits_of, has_exits
from .gate import Gate
from .gated_model import GatekitInfo, gates_of
from .losses._executed import executed_channels, executed_layers
from .macs import BlockCosts, measure_costs, static_macs

PERCENTILES = (1, 10, 50, 90, 99)


@dataclass(frozen=True)
class BlockProfile:
    """One gated block over the whole dataset."""

    name: str
    execution_rate: float
    channel_rate: float
    dense_macs: int
    mean_macs: float


@dataclass(frozen=True)
class ExitProfile:
    """One exit over the whole dataset: the fraction of samples that left there, their accuracy
    (None without labels) and their mean MACs. The final head is the last, named ``"final"``."""

    name: str
    rate: float
    accuracy: float | None
    mean_macs: float


@dataclass(frozen=True)
class Profile:
    """Result of :func:`profile`. MACs are per sample, conv + linear, gates' own MACs included."""

    dense_macs: int
    per_sample_macs: tuple[int, ...]
    gate_macs: int
    blocks: tuple[BlockProfile, ...]
    accuracy: float | None
    input_shape: tuple[int, ...]
    exits: tuple[ExitProfile, ...] = ()
    per_sample_exits: tuple[int, ...] = ()

    @property
    def mean_macs(self) -> float:
        return sum(self.per_sample_macs) / len(self.per_sample_macs)

    @property
    def saving(self) -> float:
        """Fraction of the dense MACs saved on average (negative if the gates cost more than they save)."""
        return 1.0 - self.mean_macs / self.dense_macs

    @property
    def gate_overhead(self) -> float:
        """The gates' own MACs as a fraction of the dense MACs."""
        return self.gate_macs / self.dense_macs

    def percentiles(self) -> dict[str, float]:
        macs = torch.tensor(self.per_sample_macs, dtype=torch.float64)
        return {f"p{p}": torch.quantile(macs, p / 100).item() for p in PERCENTILES}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: totals, percentiles and the per-block list (per-sample MACs included)."""
        return {
            "samples": len(self.per_sample_macs),
            "input_shape": list(self.input_shape),
            "dense_macs": self.dense_macs,
            "mean_macs": self.mean_macs,
            "saving": self.saving,
            "gate_macs": self.gate_macs,
            "gate_overhead": self.gate_overhead,
            "accuracy": self.accuracy,
            "percentiles": self.percentiles(),
            "blocks": [dataclasses.asdict(block) for block in self.blocks],
            "exits": [dataclasses.asdict(exit) for exit in self.exits],
            "per_sample_macs": list(self.per_sample_macs),
            "per_sample_exits": list(self.per_sample_exits),
        }

    def to_json(self, path: str) -> None:
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=2)

    def table(self) -> str:
        """A plain-text report: totals, then one row per block."""
        lines = [
            f"samples        {len(self.per_sample_macs)}",
            f"dense MACs     {self.dense_macs:,}",
            f"mean MACs      {self.mean_macs:,.0f}  ({100 * self.saving:.1f}% saved, gates {100 * self.gate_overhead:.3f}%)",
        ]
        if self.accuracy is not None:
            lines.append(f"accuracy       {100 * self.accuracy:.2f}%")
        if self.blocks:
            width = max(len(block.name) for block in self.blocks)
            lines.append(f"\n{'block':<{width}}  executed  channels   dense MACs    mean MACs")
            for block in self.blocks:
                lines.append(
                    f"{block.name:<{width}}  {block.execution_rate:8.3f}  {block.channel_rate:8.3f}"
                    f"  {block.dense_macs:11,}  {block.mean_macs:11,.0f}"
                )
        if self.exits:
            width = max(len(exit.name) for exit in self.exits)
            lines.append(f"\n{'exit':<{width}}      left  accuracy    mean MACs")
            for exit in self.exits:
                accuracy = "       -" if exit.accuracy is None else f"{100 * exit.accuracy:7.2f}%"
                lines.append(f"{exit.name:<{width}}  {exit.rate:8.3f}  {accuracy}  {exit.mean_macs:11,.0f}")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Save a PNG: histogram of per-sample MACs, and execution/channel rate per block."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (histogram, rates) = plt.subplots(1, 2, figsize=(12, 4))
        # A fixed range from zero keeps narrow distributions visible next to the dense line.
        top = max(self.dense_macs, max(self.per_sample_macs)) * 1.02 / 1e6
        histogram.hist([m / 1e6 for m in self.per_sample_macs], bins=50, range=(0, top))
        histogram.axvline(self.dense_macs / 1e6, color="black", linestyle="--", label="dense")
        histogram.set(xlabel="MMACs per sample", ylabel="samples", title="Per-sample MACs")
        histogram.legend()
        names = [block.name for block in self.blocks]
        positions = range(len(names))
        rates.bar([p - 0.2 for p in positions], [b.execution_rate for b in self.blocks], 0.4, label="executed")
        rates.bar([p + 0.2 for p in positions], [b.channel_rate for b in self.blocks], 0.4, label="channels")
        rates.set_xticks(list(positions), names, rotation=90)
        rates.set(ylim=(0, 1.05), ylabel="rate", title="Per block")
        rates.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def profile(
    model: nn.Module,
    data: Tensor | Dataset | Iterable,
    *,
    batch_size: int = 128,
    max_samples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Profile:
    """Run ``model`` in eval mode over ``data`` and count what each sample really cost.

    Args:
        model: a gated model from :func:`gatekit.convert`, or any dense model (every sample then costs
            the dense MACs).
        data: a tensor of inputs, a dataset of ``(input, label)`` pairs or of inputs, or an iterable
            of such batches (a DataLoader). With labels, top-1 accuracy is reported.
        batch_size: batch size when ``data`` is a tensor or a dataset.
        max_samples: stop after this many samples.
        device: where to run; by default where the model's parameters are.
        progress: show a progress bar.

    Returns:
        A :class:`Profile`; ``table()``, ``to_json(path)`` and ``plot(path)`` report it. MACs are
        measured at the data's input size.

    Raises:
        GatekitError: not a module; a device that is missing or is not the model's; no sample in
            ``data``; a batch the model cannot take; NaN gate logits (see :func:`gatekit.dynamic_macs`).

    >>> report = profile(gated, test_images, batch_size=256)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise GatekitError(f"gatekit.profile takes a torch.nn.Module, got {type(model).__name__}.")
    model_device = next(iter(model.parameters()), torch.empty(0)).device
    device = model_device if device is None else usable_device(device)
    if device != model_device and not (device.index is None and device.type == model_device.type):
        raise GatekitError(
            f"device={str(device)!r} but the model's parameters are on {model_device}: move the model "
            f"first (`model.to({str(device)!r})`), or leave `device` out to run where the model is."
        )
    tally = _Tally(model)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        # Counted in samples, so that a bar stopped by max_samples ends full.
        bar = tqdm(total=_sample_count(data, max_samples), disable=not progress, desc="profile", unit="sample")
        with torch.no_grad(), bar:
            for batch in as_batches(data, batch_size):
                inputs, labels = split_batch(batch)
                if max_samples is not None:
                    inputs, labels = inputs[: max_samples - tally.samples], _head(labels, max_samples - tally.samples)
                tally.add(inputs.to(device), labels)
                bar.update(inputs.shape[0])
                if max_samples is not None and tally.samples >= max_samples:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
    return tally.result()


class _Tally:
    """Running totals of one profile: per-sample MACs, block rates, accuracy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gated = isinstance(getattr(model, "gatekit", None), GatekitInfo)
        self.exits = has_exits(model)
        self.costs: BlockCosts | None = None
        self.exit_costs: ExitCosts | None = None
        self.per_sample_exits: list[int] = []
        self.exit_correct: list[int] = []
        self.dense_macs = 0
        self.input_shape: tuple[int, ...] = ()
        self.per_sample: list[int] = []
        self.block_sums: dict[str, list[float]] = {}
        self.correct = self.labelled = 0

    @property
    def samples(self) -> int:
        return len(self.per_sample)

    def add(self, inputs: Tensor, labels: Tensor | None) -> None:
        if inputs.shape[0] == 0:
            return
        if self.costs is None and not self.input_shape:
            self._measure(inputs[:1])
        elif tuple(inputs.shape[1:]) != self.input_shape[1:]:
            raise GatekitError(
                f"batches of different input shapes ({tuple(self.input_shape[1:])} then "
                f"{tuple(inputs.shape[1:])}): profile one input size at a time."
            )
        output = _forward(self.model, inputs)
        taken = exit_policy(self.model).taken.cpu() if self.exits else None
        if self.exits:
            self.per_sample += exit_macs(self.model, self.exit_costs).tolist()
            self.per_sample_exits += taken.tolist()
        elif self.gated:
            self.per_sample += dynamic_macs(self.model, self.costs).tolist()
        else:
            self.per_sample += [self.dense_macs] * inputs.shape[0]
        if self.gated:
            self._add_blocks(taken)
        if labels is not None:
            correct = output.argmax(1).cpu() == labels.cpu()
            self.correct += correct.sum().item()
            self.labelled += labels.numel()
            self.exit_correct += correct.tolist()

    def _measure(self, sample: Tensor) -> None:
        _forward(self.model, sample)  # a wrong input shape is reported as such, before measuring
        self.input_shape = tuple(sample.shape)
        where = f"its layers, at input shape {tuple(sample.shape[1:])}"
        if self.exits:
            with internal_errors("measuring the exits' MACs", where):
                self.exit_costs = measure_exit_costs(self.model, sample)
            self.costs = self.exit_costs.blocks
            self.dense_macs = self.costs.dense_macs if self.gated else sum(self.exit_costs.segment_macs)
        elif self.gated:
            with internal_errors("measuring the blocks' MACs", where):
                self.costs = measure_costs(self.model, self.model.gatekit.sites, sample)
            self.dense_macs = self.costs.dense_macs
        else:
            with internal_errors("counting the dense model's MACs", where):
                self.dense_macs = static_macs(self.model, sample)

    def _add_blocks(self, taken: Tensor | None) -> None:
        for index, (site, (name, gate)) in enumerate(zip(self.model.gatekit.sites, gates_of(self.model).items())):
            with internal_errors("adding up the blocks' rates", site.add_node, block=site.name):
                # With exits, a block runs only for the samples that had not left before its segment.
                reached = None if taken is None else (taken >= self.exit_costs.block_segments[index]).float()
                self._add_block(index, name, gate, reached)

    def _add_block(self, index: int, name: str, gate: Gate, reached: Tensor | None) -> None:
        runs = executed_layers(gate).cpu()
        channels = executed_channels(gate)
        channels = None if channels is None else channels.cpu()
        gate_runs = runs.numel()
        if reached is not None:
            runs, gate_runs = runs * reached, reached.sum().item()
            channels = None if channels is None else channels * reached[:, None]
        channel_sum = (channels.mean(1) if channels is not None else runs).sum().item()
        branch, scaled = self.costs.branch_macs[index], self.costs.channel_macs[index]
        fraction = channels.mean(1) if channels is not None else runs
        macs = gate.macs * gate_runs + (runs * (branch - scaled) + fraction * scaled).sum().item()
        sums = self.block_sums.setdefault(name, [0.0, 0.0, 0.0])
        sums[0] += runs.sum().item()
        sums[1] += channel_sum
        sums[2] += macs

    def result(self) -> Profile:
        if not self.per_sample:
            raise GatekitError("the data holds no sample: profile needs at least one input.")
        blocks = tuple(
            BlockProfile(name, runs / self.samples, channels / self.samples, self.costs.branch_macs[i], macs / self.samples)
            for i, (name, (runs, channels, macs)) in enumerate(self.block_sums.items())
        )
        gate_macs = sum(g.macs for g in gates_of(self.model).values()) if self.gated else 0
        if self.exits:
            gate_macs += sum(self.exit_costs.head_macs)
        return Profile(
            dense_macs=self.dense_macs,
            per_sample_macs=tuple(int(m) for m in self.per_sample),
            gate_macs=gate_macs,
            blocks=blocks,
            accuracy=self.correct / self.labelled if self.labelled else None,
            input_shape=self.input_shape,
            exits=self._exits() if self.exits else (),
            per_sample_exits=tuple(self.per_sample_exits),
        )

    def _exits(self) -> tuple[ExitProfile, ...]:
        taken = torch.tensor(self.per_sample_exits)
        macs = torch.tensor(self.per_sample, dtype=torch.float64)
        correct = torch.tensor(self.exit_correct, dtype=torch.float64) if self.labelled == self.samples else None
        names = [site.name for site in exits_of(self.model).sites] + ["final"]
        rows = []
        for index, name in enumerate(names):
            left = taken == index
            count = int(left.sum())
            rows.append(ExitProfile(
                name=name, rate=count / self.samples,
                accuracy=None if correct is None or not count else correct[left].mean().item(),
                mean_macs=macs[left].mean().item() if count else 0.0,
            ))
        return tuple(rows)


def _forward(model: nn.Module, inputs: Tensor) -> Tensor:
    try:
        return model(inputs)
    except Exception as error:
        raise GatekitError(
            f"{type(model).__name__} cannot take inputs of shape {tuple(inputs.shape[1:])} (C, H, W): "
            f"{type(error).__name__}: {error}"
        ) from error


def _head(labels: Tensor | None, count: int) -> Tensor | None:
    return None if labels is None else labels[:count]


def _sample_count(data: Any, max_samples: int | None) -> int | None:
    """Samples a profile will see, for the progress bar; None when the data does not say."""
    dataset = getattr(data, "dataset", data)  # a DataLoader's dataset
    count = len(dataset) if isinstance(dataset, (Tensor, Dataset)) and hasattr(dataset, "__len__") else None
    if max_samples is None:
        return count
    return max_samples if count is None else min(count, max_samples)
