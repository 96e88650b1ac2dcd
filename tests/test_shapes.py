"""Shape propagation on fake tensors (issue 23, conversion in seconds): the same shapes and MACs as
on real ones, the model's own weights untouched, and the real run wherever the fake one cannot go."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import gatekit
from gatekit import _shapes
from gatekit._tracing import trace_model
from gatekit.macs import node_macs


def _propagated(model: nn.Module, example: torch.Tensor, fake: bool) -> tuple[dict, dict]:
    graph_module = trace_model(model)
    _shapes.propagate_shapes(graph_module, model, example, fake=fake)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in graph_module.graph.nodes
              if hasattr(n.meta.get("tensor_meta"), "shape")}
    return shapes, {n.name: m for n, m in node_macs(graph_module).items()}


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet18(),
    lambda: torchvision.models.mobilenet_v3_small(),
    lambda: timm.create_model("gcresnet33ts"),  # bmm in its global-context blocks
    lambda: timm.create_model("pvt_v2_b0"),  # attention
], ids=["resnet18", "mobilenet_v3_small", "gcresnet33ts", "pvt_v2_b0"])
def test_fake_propagation_records_what_the_real_one_does(build):
    model, example = build().eval(), torch.randn(1, 3, 64, 64)
    fake_shapes, fake_macs = _propagated(model, example, fake=True)
    real_shapes, real_macs = _propagated(model, example, fake=False)
    assert fake_shapes == real_shapes and len(fake_shapes) > 20
    assert fake_macs == real_macs and sum(fake_macs.values()) > 0


def test_the_fake_run_leaves_the_weights_and_modes_alone():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph_module = trace_model(model)
    _shapes.propagate_shapes(graph_module, model, torch.randn(1, 3, 64, 64), fake=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(module.training for module in model.modules())


class _Stateful(nn.Module):
    """A leaf module of the user's own: it might keep state, so it runs on real tensors."""

    def forward(self, x):
        return x * 2


class _WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.leaf = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), _Stateful()

    def forward(self, x):
        x = self.stem(x)
        return self.leaf(self.conv(x)) + x


def test_a_graph_with_a_leaf_module_of_the_users_runs_on_real_tensors(monkeypatch):
    seen = []
    monkeypatch.setattr(_Stateful, "forward", lambda self, x: seen.append(type(x)) or x * 2)
    gated = gatekit.convert(_WithLeaf(), example_input=torch.randn(1, 3, 8, 8), leaf_modules=[_Stateful])
    assert seen == [torch.Tensor] and [s.name for s in gated.gatekit.sites] == ["add"]


def test_a_model_the_fake_run_cannot_follow_is_propagated_for_real():
    class DataDependent(nn.Module):  # a shape read off the data: fake tensors have no values
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            y = self.conv(x) + x
            return y * torch.nonzero(y.flatten(1)[0] > 0).shape[0]

    model = DataDependent().eval()
    assert not _shapes._propagated_on_fake_tensors(trace_model(model), torch.randn(1, 3, 8, 8))
    gated = gatekit.convert(model, example_input=torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(gated.eval()(x), model(x), atol=1e-6)
