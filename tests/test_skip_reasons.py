"""Issue 23, part 1: no false refusals. Sizes are not values, so shape reads and asserts on them keep
no branch running (SK-ResNet, CSATv2, PVT); every reason the analysis gives, each on a model that
really has it (docs/design.md says why such a block cannot be gated).
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import gatekit
from gatekit.blocks import discover
from gatekit.skipped_sites import FUSION, SHARED_LAYER, SHARED_VALUE, TUPLE_INPUT, USED_OUTSIDE
from test_coverage import coverage  # benchmarks/coverage.py, loaded once
from test_partial_blocks import check_guarantees, images

TIMM = coverage._timm_families.representatives(timm.list_models(pretrained=False))


@pytest.mark.parametrize("model_name", ["skresnet18", "skresnext50_32x4d"])
def test_sk_resnets_convert_as_a_new_user_would(model_name):
    """The issue's example: the cited 'use outside the branch' was an assert on a shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", gatekit.SkippedBlocksWarning)  # nothing left ungated
        gated = gatekit.convert(timm.create_model(model_name), example_input=torch.randn(1, 3, 32, 32))
    assert len(gated.gatekit.sites) == {"skresnet18": 8, "skresnext50_32x4d": 16}[model_name]


@pytest.mark.parametrize("family", ["skresnet", "pvt"])
def test_families_gated_again_pass_every_check(family):
    """SK-ResNet (asserts on branch shapes) and PVTv2 (a stage's height and width handed to every
    block): function kept, sparse == masked, dense and per-sample MACs == FlopCounterMode / 2."""
    result = coverage.check_timm_family(family, TIMM[family], size=32)
    assert result.outcome == "ok" and result.skipped == 0, result
    assert result.gated == {"skresnet": 8, "pvt": 14}[family]
    assert result.dense_macs_equal and result.dynamic_macs_equal


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Checked(nn.Module):
    """Two residual blocks whose branches read shapes: an assert on a branch value; a reshape by
    the block input's size that the next block reuses; a reshape by sizes read before the stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv1, self.conv2 = conv_bn(2, 4), conv_bn(4, 4), nn.Conv2d(4, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        height, width = x.shape[-2:]  # outside every branch, without the batch size
        out = self.conv1(x)
        torch._assert(out.shape[1] == 4, "four channels")
        x = x + self.conv2(out)
        batch, channels = x.shape[0], x.shape[1]  # read in the next branch, and after it
        tokens = self.mix(self.conv1(x).flatten(2).transpose(1, 2))
        x = x + tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.head(x.reshape(batch, channels, -1).mean(2))


def test_shape_reads_and_asserts_keep_every_guarantee():
    torch.manual_seed(0)
    model = Checked().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gatekit.SkippedBlocksWarning)
        gated = gatekit.convert(model, example_input=images(1)).eval()
    assert [site.name for site in gated.gatekit.sites] == ["add", "add_1"]
    check_guarantees(model, gated)  # with closed gates, the sparse model runs no branch node
    fast = gatekit.sparse(gated)
    branch = fast.gatekit_sparse_blocks.add.branch
    assert any(n.target is torch._assert for n in branch.graph.nodes)  # the assert went with its branch
    assert not any(n.target is torch._assert for n in fast.graph.nodes)


class Reasons(nn.Module):
    """What cannot be gated, each once: a branch value also stored (a side effect), an assert that
    also reads the shortcut, a batch size read outside the branch, a split whose tuple both sides
    read."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(2, 4)
        self.a, self.b, self.c, self.d = (conv_bn(4, 4) for _ in range(4))
        self.proj, self.on_piece = nn.Conv2d(4, 4, 1), nn.Conv2d(2, 2, 3, padding=1)
        self.register_buffer("seen", torch.zeros(1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        batch = x.shape[0]
        out = self.a(x)
        self.seen[0] = out.mean()  # a side effect on a branch value
        x = x + self.a(out)
        shortcut = self.proj(x)
        out = self.b(x)
        torch._assert(out.shape == shortcut.shape, "same shape")  # also reads the shortcut
        x = shortcut + self.c(out)
        x = x + self.d(x).reshape(batch, 4, 8, 8)  # the batch size, read outside the branch
        pieces = x.chunk(2, dim=1)
        x = torch.cat([self.on_piece(pieces[0]) + pieces[1], torch.cat(pieces, 1)[:, :2]], 1)
        return self.head(x.mean((2, 3)))


def test_each_reason_is_given_where_it_applies():
    model = Reasons().eval()
    sites, skipped = gatekit.gate_sites(model, example_input=images(1), skipped=True)
    reasons = {site.add_node: (site.kind, site.reason) for site in skipped}
    assert reasons["add"][0] == USED_OUTSIDE and "side effect other than a check" in reasons["add"][1]
    assert reasons["add_1"][0] == USED_OUTSIDE and "the check" in reasons["add_1"][1]
    assert reasons["add_2"][0] == FUSION and "batch size" in reasons["add_2"][1]
    assert reasons["add_3"][0] == SHARED_VALUE
    assert sites == []


def test_a_block_input_that_is_no_tensor_is_named():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, pair):
            return self.conv(pair[0]) + pair[1]

    graph_module = fx.symbolic_trace(Pair())
    ShapeProp(graph_module).propagate((torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)))
    sites, skipped = discover(graph_module)
    assert sites == [] and [site.kind for site in skipped] == [TUPLE_INPUT]


# One timm model per reason that remains, each explained in docs/design.md, at the smallest input
# it takes: (model, size, reason, blocks it gates, sites it skips for that reason).
REAL_REASONS = [
    ("dpn48b", 32, USED_OUTSIDE, 0, 16),             # the residual and the dense path share one conv
    ("efficientvim_m1", 32, USED_OUTSIDE, 25, 3),    # a stage's hidden state goes to the head
    ("lambda_resnet26t", 32, FUSION, 8, 3),          # the lambda layer adds its content and position terms
    ("hrnet_w18_small", 32, FUSION, 23, 18),         # multi-resolution fusion
    ("lcnetv2_small", 32, SHARED_LAYER, 4, 1),       # nested partial sums pick one layer
]


@pytest.mark.parametrize("model_name, size, kind, gated, skipped", REAL_REASONS)
def test_each_remaining_reason_on_a_model_that_has_it(model_name, size, kind, gated, skipped):
    model = timm.create_model(model_name).eval()
    sites, not_gated = gatekit.gate_sites(model, example_input=torch.randn(1, 3, size, size), skipped=True)
    assert len(sites) == gated
    assert sum(site.kind == kind for site in not_gated) == skipped
