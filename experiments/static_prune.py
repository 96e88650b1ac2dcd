"""Static structured pruning peer: Torch-Pruning removes block-internal filters of a dense CIFAR ResNet.

Every block's first conv keeps the same fraction of its filters, ranked by L1 norm (Torch-Pruning's
``MagnitudeImportance``); ``DependencyGraph`` slices the batch norm after it and the input channels of
the consumer conv. Shortcut and stem channels stay, as gating leaves them too. The fraction is the
largest that brings the model's MACs under ``fraction`` of the dense MACs. The pruned network is
then exactly ``cifar/resnet<depth>`` with ``widths=[...]``, so it saves, loads and profiles as a
registered model.
"""
from __future__ import annotations

import torch
import torch_pruning
from torch import nn

from gatekit.adapters import get_model, model_entry
from gatekit.macs import static_macs


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in (model.layer1, model.layer2, model.layer3) for block in stage]


def widths_for(name: str, fraction: float, model_kwargs: dict) -> list[int]:
    """Uniform keep ratio per block whose MACs come nearest ``fraction`` of dense from below."""
    model = get_model(name, **model_kwargs)
    example = torch.zeros(1, *model_entry(name).input_size)
    dense = static_macs(model, example)
    planes = [block.conv1.out_channels for block in _blocks(model)]
    for keep in range(64, 0, -1):  # keep/64 of every block's filters
        widths = [max(1, round(p * keep / 64)) for p in planes]
        if static_macs(get_model(name, widths=widths, **model_kwargs), example) <= fraction * dense:
            return widths
    return [1] * len(planes)


def prune_to_widths(dense: nn.Module, name: str, widths: list[int], model_kwargs: dict) -> nn.Module:
    """Prune a trained dense model (a copy) to ``widths`` and return it as ``get_model(name, widths=...)``."""
    model = get_model(name, **model_kwargs)
    model.load_state_dict(dense.state_dict())
    model.eval()
    example = torch.zeros(1, *model_entry(name).input_size)
    graph = torch_pruning.DependencyGraph().build_dependency(model, example_inputs=example)
    importance = torch_pruning.importance.MagnitudeImportance(p=1)
    for block, width in zip(_blocks(model), widths):
        conv = block.conv1
        if width >= conv.out_channels:
            continue
        group = graph.get_pruning_group(conv, torch_pruning.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        scores = importance(group)  # one score per filter, summed over the group's coupled layers
        pruned = scores.argsort()[: conv.out_channels - width].tolist()
        graph.get_pruning_group(conv, torch_pruning.prune_conv_out_channels, idxs=pruned).prune()
    static = get_model(name, widths=widths, **model_kwargs)
    static.load_state_dict(model.state_dict())
    return static
