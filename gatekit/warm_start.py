"""Starting the channel gates from a static pruner's solution instead of from "every filter on"."""
from __future__ import annotations

import math
from numbers import Real
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import GatekitError
from .gated_model import gates_of, info_of, unwrapped
from .losses.mac_budget import check_budget

# Keep fractions tried, in steps of 1/256 of each block's filters: fine enough that the cost lands
# within a fraction of a point of any budget on a ResNet20 (16-64 filters per block).
_STEPS = 256


def warm_start(
    model: nn.Module, budget: float, *, scores: Mapping[str, Tensor] | None = None, logit: float = 3.0
) -> float:
    """Set the channel gates to what a uniform magnitude pruner at ``budget`` keeps, for every input.

    Every gated block keeps the same fraction of its filters, the largest whose cost stays within
    ``budget`` of the dense MACs (gates included, layer gates open); within a block, the filters
    with the largest ``scores`` stay on. Each channel head is set to zero weights and a bias of
    ``+logit`` on a kept filter and ``-logit`` on the rest. In eval mode the model then computes
    what the statically pruned network computes, and finetuning has to earn input dependence on top
    of it, rather than discover the static part from scratch (docs/howto/finetune.md). Layer gates
    are left as they are (open, after :func:`gatekit.convert`).

    With top-k channel gates (``gatekit.convert(..., channel_keep=...)``) the number of filters is
    not warm_start's to choose: each block keeps its ``k`` filters with the largest ``scores``, the
    ones top-k then keeps for every input, and the returned cost is the one ``channel_keep`` sets.
    Above ``budget``, the layer gates have to close blocks for the rest (a ``MacBudgetLoss`` does);
    without layer gates that cannot happen, and it is an error.

    Args:
        model: a model from :func:`gatekit.convert` with channel gates; changed in place.
        budget: the cost to start at, as a fraction of ``model.gatekit.dense_macs``, in (0, 1].
        scores: per-filter importance by block name (a tensor of the block's gated channel count);
            by default the mean over the filter's layers (first conv, per-channel layers after it,
            consumer conv) of each one's L1 norm for that filter, as Torch-Pruning's
            ``MagnitudeImportance(p=1)`` ranks a dependency group: a static pruner with that
            importance keeps the same filters.
        logit: magnitude of the head biases; at 3 the training noise flips 4.7 % of the decisions.

    Returns:
        The cost of the started model as a fraction of the dense MACs (at most ``budget``, except
        with top-k channel gates: above).

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: no channel gates, a budget outside (0, 1] or below what one filter per block
            costs (with top-k channel gates and no layer gates: below what ``channel_keep`` costs), a
            non-positive ``logit``, or ``scores`` of the wrong blocks or shapes.

    >>> gated = gatekit.convert(resnet, regularizer=gatekit.MacBudgetLoss(budget=0.5))  # doctest: +SKIP
    >>> gatekit.warm_start(gated, 0.5)  # doctest: +SKIP
    0.4987
    """
    check_budget(budget)
    if isinstance(logit, bool) or not (isinstance(logit, Real) and math.isfinite(logit) and logit > 0):
        raise GatekitError(f"logit={logit!r}: give the head biases' magnitude, a positive number.")
    info = info_of(model)
    gates = gates_of(model)
    if "channel" not in info.mode:
        raise GatekitError(
            f"warm_start sets channel gates, and this model was converted with gates={info.mode!r}: "
            f"convert with gates='channel+layer' or 'channel'."
        )
    scores = _filter_scores(unwrapped(model), info.sites) if scores is None else _checked(scores, info.sites)
    fixed = info.dense_macs - sum(site.channel_macs for site in info.sites) + sum(g.macs for g in gates.values())

    def kept(fraction: float) -> list[int]:
        return [max(1, round(site.channels * fraction)) for site in info.sites]

    def cost(counts: list[int]) -> float:
        scaled = sum(site.channel_macs * count / site.channels for site, count in zip(info.sites, counts))
        return (fixed + scaled) / info.dense_macs

    if any(gate.keep is not None for gate in gates.values()):
        counts = [gates[site.name].keep or site.channels for site in info.sites]
        _check_top_k_budget(cost(counts), budget, info)
    else:
        counts = next((kept(step / _STEPS) for step in range(_STEPS, 0, -1) if cost(kept(step / _STEPS)) <= budget), None)
    if counts is None:
        raise GatekitError(
            f"budget={budget} is below what the channel gates can reach with one filter per block "
            f"({cost(kept(0.0)):.3f} of the dense MACs): choose a larger budget, or leave the rest to "
            f"the layer gates and start them from a larger one."
        )
    with torch.no_grad():
        for site, count in zip(info.sites, counts):
            head = gates[site.name].channel_head
            order = scores[site.name].to(head.bias.device).argsort(descending=True)
            bias = torch.full_like(head.bias, -float(logit))
            bias[order[:count]] = float(logit)
            head.weight.zero_()
            head.bias.copy_(bias)
    return cost(counts)


def _check_top_k_budget(cost: float, budget: float, info) -> None:
    """Top-k channel gates fix the channel cost; only layer gates could bring it under ``budget``."""
    if cost > budget and "layer" not in info.mode:
        raise GatekitError(
            f"budget={budget}: with channel_keep={info.options.get('channel_keep')} every input keeps the "
            f"same filters' worth of work, {cost:.3f} of the dense MACs, and gates={info.mode!r} has no "
            f"layer gates to save the rest. Convert with a smaller channel_keep, or warm start at "
            f"budget={math.ceil(cost * 1000) / 1000}."
        )


def _filter_scores(model: nn.Module, sites) -> dict[str, Tensor]:
    nodes = {node.name: node for node in model.graph.nodes} if hasattr(model, "graph") else {}
    scores = {}
    for site in sites:
        per_layer = [_layer_norms(model.get_submodule(nodes[name].target), role, site.channels)
                     for name, role in site.sliced_layers if name in nodes and nodes[name].op == "call_module"]
        per_layer = [norms for norms in per_layer if norms is not None]
        if not per_layer:  # no layer to read: the first conv's own filters
            per_layer = [model.get_submodule(site.first_conv).weight.detach().abs().flatten(1).sum(1)]
        scores[site.name] = torch.stack(per_layer).mean(0)
    return scores


def _layer_norms(module: nn.Module, role: str, channels: int) -> Tensor | None:
    """One layer's L1 norm per gated channel: output filters of the first layer, per-channel
    weights of a norm or depthwise conv, input slices of the consumer; None where it has none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    weight = weight.detach().abs()
    if role == "consumer":
        if getattr(module, "groups", 1) != 1:
            return None
        norms = weight.transpose(0, 1).flatten(1).sum(1)
    else:
        norms = weight.flatten(1).sum(1) if weight.dim() > 1 else weight
    return norms if norms.shape == (channels,) else None


def _checked(scores: Mapping[str, Tensor], sites) -> dict[str, Tensor]:
    names = [site.name for site in sites]
    if sorted(scores) != sorted(names):
        raise GatekitError(f"scores name blocks {sorted(scores)}; give one tensor for each gated block: {names}.")
    for site in sites:
        if tuple(torch.as_tensor(scores[site.name]).shape) != (site.channels,):
            raise GatekitError(
                f"scores['{site.name}'] has shape {tuple(torch.as_tensor(scores[site.name]).shape)}; give one "
                f"score per gated filter: ({site.channels},)."
            )
    return {name: torch.as_tensor(value) for name, value in scores.items()}
