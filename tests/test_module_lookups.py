"""Generated code that looks up each parent module once per forward (gatekit/_module_lookups.py)."""
import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import gatekit
from gatekit._module_lookups import hoist_module_lookups
from toy_models import ToyResNet

X = torch.randn(2, 3, 8, 8)


class Nested(nn.Module):
    """Module paths with numbers in them, one Sequential inside another, and a top-level module
    whose call fx names ``self_blocks``: the name the lookup of ``blocks`` would take."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Conv2d(4, 4, 1))
        self.self = nn.Module()
        self.self.blocks = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.self.blocks(self.blocks(x))


def count_module_lookups(model: nn.Module, monkeypatch: pytest.MonkeyPatch, x: torch.Tensor) -> int:
    """How many ``nn.Module.__getattr__`` calls during ``model(x)`` return a module, after a first
    call that builds the gates' caches."""
    with torch.no_grad():
        model(x)
    found = []
    original = nn.Module.__getattr__

    def counting(module, name):
        value = original(module, name)
        if isinstance(value, nn.Module):
            found.append(name)
        return value

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(nn.Module, "__getattr__", counting)
        model(x)
    return len(found)


def parents_and_calls(graph_module: fx.GraphModule) -> tuple[set[str], int]:
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
    parents = {".".join(target.split(".")[:end]) for target in targets for end in range(1, target.count(".") + 1)}
    return parents, len(targets)


def test_each_parent_module_is_looked_up_once_per_forward(monkeypatch):
    gated = gatekit.convert(ToyResNet(), example_input=X[:1]).eval()
    parents, calls = parents_and_calls(gated)
    assert "blocks.0" in parents
    assert count_module_lookups(gated, monkeypatch, X) == calls + len(parents)
    unhoisted = copy.deepcopy(gated)
    unhoisted.graph._codegen._body_transformer = None
    unhoisted.recompile()
    assert count_module_lookups(unhoisted, monkeypatch, X) > calls + len(parents)
    with torch.no_grad():
        assert torch.equal(unhoisted(X), gated(X))


def test_nested_paths_and_clashing_names_compute_what_fx_computes(monkeypatch):
    model = Nested()
    traced = fx.symbolic_trace(model)
    assert "self_blocks" in {node.name for node in traced.graph.nodes}
    hoist_module_lookups(traced)
    parents, calls = parents_and_calls(traced)
    assert parents == {"blocks", "blocks.0", "self"}
    assert count_module_lookups(traced, monkeypatch, X) == calls + len(parents)
    with torch.no_grad():
        assert torch.equal(traced(X), model(X))


def hooked_copy(module: nn.Module, calls: list) -> nn.Module:
    copied = copy.deepcopy(module)
    copied.register_forward_hook(lambda *args: calls.append(1))
    return copied


def test_a_module_swapped_in_after_conversion_is_called():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1]).eval()
    block, calls = gated.get_submodule("blocks.0"), []
    conv = copy.deepcopy(block.conv2)
    swaps = [
        lambda: setattr(block, "conv2", hooked_copy(conv, calls)),
        lambda: block.add_module("conv2", hooked_copy(conv, calls)),
        lambda: block._modules.__setitem__("conv2", hooked_copy(conv, calls)),
    ]
    for swap in swaps:
        swap()
        calls.clear()
        with torch.no_grad():
            gated(X)
        assert calls == [1]
    stage = copy.deepcopy(gated.blocks)  # a parent replaced: its new children are called
    stage.get_submodule("0").conv2 = hooked_copy(conv, calls)
    gated.blocks = stage
    calls.clear()
    with torch.no_grad():
        gated(X)
    assert calls == [1]


def test_copies_keep_the_code_and_edits_regenerate_it():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1]).eval()
    copied = copy.deepcopy(gated)
    assert copied.code == gated.code and "self_blocks_0.conv1(" in copied.code
    # A pass moves a call to a module at a new path: the locals follow the graph as it is now.
    copied.add_submodule("extra.inner", nn.Identity())
    node = next(n for n in copied.graph.nodes if n.target == "blocks.0.conv2")
    node.target = "extra.inner"
    copied.recompile()
    assert "self_extra.inner(" in copied.code and "self_blocks_0.conv2" not in copied.code
    with torch.no_grad():
        assert copied(X).shape == gated(X).shape


def test_a_code_transformer_already_there_is_kept():
    traced = fx.symbolic_trace(Nested())
    traced.graph.on_generate_code(lambda _: lambda body: ["# mine\n", *body])
    hoist_module_lookups(traced)
    assert "# mine" in traced.code and 'getattr(self.blocks, "0")' in traced.code
