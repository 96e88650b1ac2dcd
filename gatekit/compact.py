"""gatekit.compact: fold what the gates decide the same way for every calibration input into the
architecture, so that only what really depends on the input pays for gating.

A filter whose channel gate never opens is sliced away (first conv, the channel-wise layers after it
and the consumer's inputs, as a static pruner would); a gate that always opens is dropped, so its
block runs ungated; a block whose layer gate never opens is removed. The result is still a gated
model: it converts to :func:`gatekit.sparse`, profiles, and saves and loads with :func:`gatekit.save`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._fold import Plan, apply_plan, can_slice_filters
from ._nesting import enclosing_blocks
from .errors import GatekitError
from .gated_model import gates_of, info_of, unwrapped
from ._batches import as_batches, split_batch
from .profiler import _forward


@dataclass(frozen=True)
class BlockFold:
    """What :func:`compact` did to one gated block: ``removed`` (never ran), the gated filters it had
    and kept, and whether its channel and layer gates are still there (False: dropped, or never had)."""

    name: str
    removed: bool
    filters: int
    filters_kept: int
    channel_gate: bool
    layer_gate: bool


@dataclass(frozen=True)
class Compaction:
    """The report of :func:`compact`, found on the compacted model as ``model.gatekit_compaction``.

    ``differing_samples`` counts the calibration inputs whose gate decisions contradict a fold (0 by
    construction); ``max_output_difference`` is the largest absolute difference between the gated and
    the compacted model's outputs on them. ``dense_macs`` are per-sample MACs with every gate open,
    before and after. Inputs outside the calibration set may decide differently: count them with
    :meth:`differing`.
    """

    blocks: tuple[BlockFold, ...]
    calibration_samples: int
    differing_samples: int
    max_output_difference: float
    dense_macs_before: int
    dense_macs_after: int
    plan: tuple[dict[str, Any], ...]

    def differing(self, gated: nn.Module, data: Tensor | Dataset | Iterable, *, batch_size: int = 128) -> int:
        """How many inputs of ``data`` the gated model decides differently from what was folded
        (a removed block or filter that would run, a dropped gate that would close): on those the
        compacted model's output differs from the gated model's.

        Raises:
            GatekitError: ``gated`` is not the model this was compacted from, or ``data`` has no sample.
        """
        if [site.name for site in info_of(gated).sites] != [entry["block"] for entry in self.plan]:
            raise GatekitError("`gated` is not the model this compaction was made from: pass that gated model.")
        observed, _ = _observe(gated, data, batch_size, None)
        return int(_contradicted(list(self.plan), observed).sum())

    def table(self) -> str:
        """A plain-text summary: one line per block, then the totals."""
        lines = [f"{'block':<24} {'fold':<12} {'filters kept':>14}  gates left"]
        for block in self.blocks:
            fold = "removed" if block.removed else "ungated" if not (block.channel_gate or block.layer_gate) else "gated"
            left = [gate for gate, on in (("channel", block.channel_gate), ("layer", block.layer_gate)) if on]
            gates = "-" if block.removed else "+".join(left) or "none"
            lines.append(f"{block.name:<24} {fold:<12} {block.filters_kept:>6} / {block.filters:<5}  {gates}")
        lines.append(
            f"dense MACs {self.dense_macs_before:,} -> {self.dense_macs_after:,}; calibration inputs "
            f"{self.calibration_samples}, deciding differently {self.differing_samples}, largest output "
            f"difference {self.max_output_difference:.2e}"
        )
        return "\n".join(lines)


def compact(
    model: nn.Module, data: Tensor | Dataset | Iterable, *, batch_size: int = 128, max_samples: int | None = None,
) -> fx.GraphModule:
    """Return a copy of a gated model with what its gates decide identically on ``data`` folded in.

    Over the calibration inputs ``data`` (in eval mode): filters whose channel gate never opens where
    their block runs are removed physically (the gated layer's outputs, the channel-wise layers after
    it, the consumer's inputs); a channel or layer gate that always opens is dropped; a block whose
    layer gate never opens is removed (it becomes its shortcut). On ``data`` the result computes what
    ``model`` computes. Unseen inputs may decide differently; see :meth:`Compaction.differing`. A
    block whose filters pass a layer gatekit cannot slice, or that never opens any filter, keeps them all.

    Args:
        model: a gated model from :func:`gatekit.convert` (not a sparse one); it is not modified.
        data: calibration inputs: a tensor, a dataset of inputs or ``(input, label)`` pairs, or an
            iterable of such batches (a DataLoader).
        batch_size: batch size when ``data`` is a tensor or a dataset.
        max_samples: use at most this many calibration inputs.

    Returns:
        A gated ``torch.fx.GraphModule``, each module in ``model``'s train/eval mode. Its report, a
        :class:`Compaction`, is ``result.gatekit_compaction``.

    Raises:
        NotConvertedError: ``model`` has no gates.
        GatekitError: ``model`` is a sparse model; ``data`` holds no sample or a batch the model cannot take.

    >>> small = gatekit.compact(gated, calibration_images)  # doctest: +SKIP
    >>> print(small.gatekit_compaction.table())  # doctest: +SKIP
    >>> fast = gatekit.sparse(small)  # doctest: +SKIP
    """
    from .sparse import SparseModel

    model = unwrapped(model)
    info = info_of(model)
    if isinstance(model, SparseModel):
        raise GatekitError(
            "compact the gated model, then make the result sparse: `gatekit.sparse(gatekit.compact(gated, data))`."
        )
    observed, samples = _observe(model, data, batch_size, max_samples)
    plan = _plan(model, observed)
    compacted = apply_plan(copy.deepcopy(model), plan)
    difference = _output_difference(model, compacted, data, batch_size, max_samples)
    report = Compaction(
        blocks=tuple(_block_fold(entry, gate.channels) for entry, gate in zip(plan, gates_of(model).values())),
        calibration_samples=samples,
        differing_samples=int(_contradicted(plan, observed).sum()),
        max_output_difference=difference,
        dense_macs_before=info.dense_macs,
        dense_macs_after=compacted.gatekit.dense_macs,
        plan=tuple(plan),
    )
    compacted.gatekit_compaction = report
    compacted.meta.setdefault("_user_preserved_attributes", {})["gatekit_compaction"] = report
    return compacted


@dataclass
class _Observed:
    """One block's decisions over the calibration inputs: where it was reached (every enclosing
    block ran), where it ran, and its channel decisions ([samples, filters], or None)."""

    reached: np.ndarray
    runs: np.ndarray
    channels: np.ndarray | None
    layer_gated: bool
    sliceable: bool


def _observe(model: nn.Module, data: Any, batch_size: int, max_samples: int | None) -> tuple[list[_Observed], int]:
    model = unwrapped(model)
    info = info_of(model)
    gates = list(gates_of(model).values())
    enclosing = enclosing_blocks(info.sites)
    layers: list[list[np.ndarray]] = [[] for _ in gates]
    channels: list[list[np.ndarray]] = [[] for _ in gates]
    samples = 0
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for inputs in _inputs(data, batch_size, max_samples):
                _forward(model, inputs)
                samples += inputs.shape[0]
                for index, gate in enumerate(gates):
                    layer = gate.layer_gates if gate.layer_gates is not None else torch.ones(inputs.shape[0])
                    layers[index].append(layer.detach().cpu().numpy() > 0.5)
                    if gate.channel_gates is not None:
                        channels[index].append(gate.channel_gates.detach().cpu().numpy() > 0.5)
    finally:
        for module, training in modes.items():
            module.training = training
    if samples == 0:
        raise GatekitError("the calibration data holds no sample: compact needs at least one input.")
    layer_decisions = [np.concatenate(parts) for parts in layers]
    observed = []
    for index, (site, gate) in enumerate(zip(info.sites, gates)):
        reached = np.ones(samples, dtype=bool)
        for outer in enclosing[index]:
            reached &= layer_decisions[outer]
        observed.append(_Observed(
            reached=reached,
            runs=reached & layer_decisions[index],
            channels=np.concatenate(channels[index]) if channels[index] else None,
            layer_gated=gate.layer_head is not None,
            sliceable=can_slice_filters(model, site),
        ))
    return observed, samples


def _plan(model: nn.Module, observed: list[_Observed]) -> Plan:
    plan = []
    for site, seen in zip(info_of(model).sites, observed):
        entry: dict[str, Any] = dict(block=site.name, removed=False, kept=None, channel_gate=False, layer_gate=False)
        if seen.layer_gated and not seen.runs.any():
            entry["removed"] = True
            plan.append(entry)
            continue
        entry["layer_gate"] = seen.layer_gated and not seen.runs[seen.reached].all()
        if seen.channels is not None:
            opened = seen.channels[seen.runs]
            ever = opened.any(0)
            if seen.sliceable and 0 < ever.sum() < ever.size:
                entry["kept"] = np.flatnonzero(ever).tolist()
            kept = ever if entry["kept"] is not None else np.ones_like(ever)
            entry["channel_gate"] = not opened[:, kept].all()
        plan.append(entry)
    return plan


def _contradicted(plan: Plan, observed: list[_Observed]) -> np.ndarray:
    """Per input: whether any fold of ``plan`` contradicts its decisions (it would compute otherwise)."""
    bad = np.zeros(observed[0].reached.shape[0] if observed else 0, dtype=bool)
    for entry, seen in zip(plan, observed):
        if entry["removed"]:
            bad |= seen.runs
            continue
        if seen.layer_gated and not entry["layer_gate"]:
            bad |= seen.reached & ~seen.runs
        if seen.channels is not None:
            kept = np.zeros(seen.channels.shape[1], dtype=bool)
            kept[entry["kept"] if entry["kept"] is not None else slice(None)] = True
            wrong = seen.channels[:, ~kept].any(1)
            if not entry["channel_gate"]:
                wrong |= ~seen.channels[:, kept].all(1)
            bad |= seen.runs & wrong
    return bad


def _output_difference(gated: nn.Module, compacted: nn.Module, data: Any, batch_size: int, max_samples: int | None) -> float:
    worst = 0.0
    modes = {module: module.training for module in list(gated.modules()) + list(compacted.modules())}
    gated.eval(), compacted.eval()
    try:
        with torch.no_grad():
            for inputs in _inputs(data, batch_size, max_samples):
                difference = (_forward(gated, inputs) - _forward(compacted, inputs)).abs()
                worst = max(worst, float(difference.max()))
    finally:
        for module, training in modes.items():
            module.training = training
    return worst


def _inputs(data: Any, batch_size: int, max_samples: int | None) -> Iterator[Tensor]:
    """The non-empty input batches of ``data``, the last one cut so that at most ``max_samples`` pass."""
    samples = 0
    for batch in as_batches(data, batch_size):
        inputs, _ = split_batch(batch)
        if max_samples is not None:
            inputs = inputs[: max_samples - samples]
        if inputs.shape[0] == 0:
            continue
        yield inputs
        samples += inputs.shape[0]
        if max_samples is not None and samples >= max_samples:
            return


def _block_fold(entry: dict[str, Any], filters: int) -> BlockFold:
    kept = 0 if entry["removed"] else len(entry["kept"]) if entry["kept"] is not None else filters
    return BlockFold(entry["block"], entry["removed"], filters, kept, entry["channel_gate"], entry["layer_gate"])


def apply_saved_plans(model: fx.GraphModule, plans: list[Plan]) -> fx.GraphModule:
    """Fold saved plans into a freshly converted model, in order (what :func:`gatekit.load` does)."""
    for plan in plans:
        model = apply_plan(model, plan)
    return model
