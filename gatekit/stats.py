"""Gate statistics of the last forward pass, for logging."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .gated_model import gates_of
from .losses._executed import check_forward, executed_channels, executed_layers


@dataclass(frozen=True)
class BlockStats:
    """Execution of one gated block over the last batch.

    Attributes:
        execution_rate: fraction of samples that ran the block (1.0 without layer gates).
        channel_rate: fraction of the block's gated filters that ran, averaged over all samples; a
            filter of a skipped block counts as not run, because it costs nothing.
    """

    execution_rate: float
    channel_rate: float


def gate_stats(model: nn.Module) -> dict[str, BlockStats]:
    """Per-block execution and channel rates of the last forward, by dotted block name.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: the model has not run since conversion.

    >>> model(images)  # doctest: +SKIP
    >>> {name: s.execution_rate for name, s in gate_stats(model).items()}  # doctest: +SKIP
    {'layer1.0': 0.97, ...}
    """
    stats = {}
    for name, gate in gates_of(model).items():
        check_forward(name, gate)
        channels = executed_channels(gate)
        stats[name] = BlockStats(
            execution_rate=executed_layers(gate).float().mean().item(),
            channel_rate=channels.float().mean().item() if channels is not None else executed_layers(gate).float().mean().item(),
        )
    return stats


def summarize(stats: dict[str, BlockStats]) -> dict[str, float]:
    """Mean execution and channel rates over blocks, e.g. for one line of a training log."""
    count = len(stats)
    return {
        "execution_rate": sum(s.execution_rate for s in stats.values()) / count,
        "channel_rate": sum(s.channel_rate for s in stats.values()) / count,
    }


def stats_as_dict(stats: dict[str, BlockStats]) -> dict[str, dict[str, float]]:
    """Plain nested dicts, ready for ``json.dumps``."""
    return {name: asdict(block) for name, block in stats.items()}
