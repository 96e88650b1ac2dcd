"""Early exits that really stop: the graph cut into segments at the exits, and a runner that carries
on with only the samples that have not left.

Segment ``k`` is a GraphModule of its own (sharing the model's modules) whose inputs are the values
earlier segments hand on and whose outputs are the values later segments need, plus exit ``k``'s
logits. After each segment the runner decides who leaves, writes their logits into the output in
their places, and passes the rest on, cut to the remaining samples. At batch 1 a sample that leaves
returns at once.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._module_lookups import hoist_module_lookups
from ._shapes import propagate_shapes
from .errors import GatekitError
from .exit_head import ExitHead
from .exit_macs import _segments
from .exit_policy import ExitPolicy, confidence
from ._exit_info import ExitInfo


class EarlyExitModel(nn.Module):
    """The inference form of a model with exits, from :func:`split_at_exits`. Eval only.

    After a forward, ``taken`` holds each sample's exit index (``len(exits)``: the final head).
    """

    def __init__(self, segments: list[fx.GraphModule], policy: ExitPolicy) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)  # each returns what later ones need, its head's logits last
        self.policy = policy
        self.taken: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.policy.training:
            raise GatekitError("an early-exit model runs in eval mode only: call `model.eval()` on the model it came from.")
        values: tuple = (x,)
        batch = x.shape[0]
        remaining = torch.arange(batch, device=x.device)
        taken = torch.full((batch,), len(self.segments) - 1, dtype=torch.long, device=x.device)
        output: Tensor | None = None
        last = len(self.segments) - 1
        for index, segment in enumerate(self.segments):
            results = segment(*values)
            if index == last:
                logits = results
                output = _place(output, logits, remaining, batch)
                break
            *values, logits = results
            confidence = _confidence(self.policy, logits, index)
            leaves = confidence >= self.policy.thresholds[index]
            if bool(leaves.any()):
                output = _place(output, logits[leaves], remaining[leaves], batch)
                taken[remaining[leaves]] = index
                stays = ~leaves
                if not bool(stays.any()):
                    break
                remaining = remaining[stays]
                values = [value[stays] for value in values]
        self.taken = taken
        return output


def split_at_exits(model: fx.GraphModule, info: ExitInfo) -> EarlyExitModel:
    """Cut a model with exits (plain, gated or sparse) into the segments an :class:`EarlyExitModel` runs.

    Raises:
        ExitsError: the model has no exits.
        GatekitError: a value crossing an exit is not a batch-first tensor (it could not be cut to
            the remaining samples).
    """
    if any("tensor_meta" not in node.meta for node in model.graph.nodes if node.op == "call_module"):
        propagate_shapes(model, model, torch.zeros(info.input_shape, dtype=next(iter(model.parameters())).dtype))
    graph = model.graph
    heads = [node for node in graph.nodes if _calls(model, node, ExitHead)]
    policy_node = next(node for node in graph.nodes if _calls(model, node, ExitPolicy))
    exit_nodes = [head.args[0] for head in heads]
    segment_of = _segments(graph, exit_nodes)
    for index, head in enumerate(heads):
        segment_of[head] = index  # a head runs right after the segment that computes its input
    final = policy_node.args[0]
    body = [n for n in graph.nodes if n.op not in ("output", "get_attr") and n is not policy_node]
    count = len(heads) + 1
    needed_after = [set() for _ in range(count)]  # values defined up to segment k that later ones read
    for node in body:
        for parent in node.all_input_nodes:
            if parent.op == "get_attr":
                continue
            for k in range(segment_of[parent], segment_of[node]):
                needed_after[k].add(parent)
    order = {node: i for i, node in enumerate(graph.nodes)}
    carried = [sorted(nodes, key=order.__getitem__) for nodes in needed_after]
    for nodes in carried:
        for node in nodes:
            if node.op != "placeholder" and not _batch_tensor(node):
                raise GatekitError(
                    f"the value '{node.name}' crosses an exit but is not a batch-first tensor, so it cannot be "
                    f"cut to the samples that remain: keep the exits elsewhere (`at=`)."
                )
    segments = []
    for k in range(count):
        inputs = [graph.find_nodes(op="placeholder")[0]] if k == 0 else carried[k - 1]
        members = [node for node in body if segment_of[node] == k and node.op != "placeholder"]
        outputs = final if k == count - 1 else (*carried[k], heads[k])
        segments.append(_segment_module(model, inputs, members, outputs))
    return EarlyExitModel(segments, _module(model, policy_node))


def _segment_module(model: fx.GraphModule, inputs: list[fx.Node], members: list[fx.Node], outputs) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env and node.op == "get_attr":  # parameters and buffers: read in each segment
            env[node] = graph.node_copy(node, lookup)
        return env[node]

    for node in members:
        env[node] = graph.node_copy(node, lookup)
    graph.output(lookup(outputs) if isinstance(outputs, fx.Node) else tuple(lookup(n) for n in outputs))
    segment = fx.GraphModule(model, graph, f"{type(model).__name__}Segment")
    hoist_module_lookups(segment)
    return segment


def _module(model: fx.GraphModule, node: fx.Node) -> object:
    target = model
    for name in str(node.target).split("."):
        target = getattr(target, name)
    return getattr(target, "__self__", target)  # sparse models call some modules through bound methods


def _calls(model: fx.GraphModule, node: fx.Node, kind: type) -> bool:
    return node.op == "call_module" and isinstance(_module(model, node), kind)


def _batch_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) >= 1


def _confidence(policy: ExitPolicy, logits: Tensor, index: int) -> Tensor:
    return confidence(logits / policy.temperatures[index], policy.rule)


def _place(output: Tensor | None, logits: Tensor, where: Tensor, batch: int) -> Tensor:
    if output is None:
        if logits.shape[0] == batch:  # everyone at once: no copy
            return logits
        output = logits.new_empty((batch, *logits.shape[1:]))
    output[where] = logits
    return output
