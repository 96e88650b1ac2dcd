"""Issue 14's patterns, each in a small model: a shortcut added to a channel slice (ReXNet), blocks in
a multi-branch fusion stage (HRNet), and blocks whose input comes out of a split (Res2Net, CSP).
Each converts with its gateable blocks gated and keeps the zoo guarantees (function preserved,
sparse == masked, dynamic MACs == FlopCounterMode); the others are skipped with a stated reason,
and nothing but a GatekitError ever reaches the user.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gatekit
import gatekit.blocks
from gatekit.skipped_sites import FUSION, INTERNAL, SHARED_LAYER, USED_OUTSIDE
from test_fuzz import force_gates


def conv_bn(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PartialResidual(nn.Module):
    """ReXNet's block: the input (4 channels) is added to the first 4 of the branch's 6 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(2, 4)
        self.conv1, self.conv2 = conv_bn(4, 8), nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv2(self.conv1(x))
        out = torch.cat([out[:, :4] + x, out[:, 4:]], dim=1)
        return self.head(out.mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(channels, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(self.conv1(x)))


class FusionStage(nn.Module):
    """HRNet's pattern: two resolutions, each with a residual block, then each fused into the other."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(2, 4)
        self.down = conv_bn(4, 4)
        self.high_block, self.low_block = BasicBlock(4), BasicBlock(4)
        self.low_to_high = nn.Conv2d(4, 4, 1)
        self.high_to_low = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        high = self.stem(x)
        low = F.avg_pool2d(self.down(high), 2)
        high, low = self.high_block(high), self.low_block(low)
        fused_high = high + F.interpolate(self.low_to_high(low), scale_factor=2.0)
        fused_low = low + self.high_to_low(high)
        return self.head(torch.cat([fused_high.mean((2, 3)), fused_low.mean((2, 3))], 1))


class SplitBlocks(nn.Module):
    """A residual block on one chunk of its input (CSP), and a branch from one split piece added to
    another piece."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(2, 8)
        self.block = BasicBlock(4)
        self.mix = conv_bn(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        kept, piece = x.chunk(2, dim=1)
        x = torch.cat([kept, self.block(piece)], 1)
        first, second = torch.split(x, 4, dim=1)
        x = torch.cat([first + self.mix(second), first], 1)
        return self.head(x.mean((2, 3)))


def images(count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 2, 8, 8, generator=generator) + 2 * torch.randn(count, 2, 1, 1, generator=generator)


def build(model_class: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = model_class()
    for module in model.modules():  # random statistics, so that no branch is trivial
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(1, 2)
    return model.eval()


def convert_quietly(model: nn.Module, **options) -> tuple[torch.fx.GraphModule, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = gatekit.convert(model, example_input=images(1), **options)
    return gated.eval(), [w for w in caught if issubclass(w.category, gatekit.SkippedBlocksWarning)]


def check_guarantees(model: nn.Module, gated: nn.Module) -> None:
    """The zoo's checks: function kept with open gates; sparse == masked == counted MACs otherwise."""
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model(x), atol=1e-5, rtol=1e-5)
        for forcings in (["closed"], ["some_channels"], ["per_sample", "open"]):
            force_gates(gated, forcings, seed=1)
            fast = gatekit.sparse(gated)
            torch.testing.assert_close(fast(x), gated(x), atol=1e-5, rtol=1e-5)
            for image in x.split(1):
                masked = gated(image)
                with FlopCounterMode(display=False) as counter:
                    output = fast(image)
                assert counter.get_total_flops() // 2 == gatekit.dynamic_macs(gated).item()
                torch.testing.assert_close(output, masked, atol=1e-5, rtol=1e-5)


def test_partial_residual_is_gated_and_a_closed_gate_keeps_the_shortcut_in_its_slice():
    model = build(PartialResidual)
    gated, caught = convert_quietly(model)
    assert caught == []
    (site,) = gated.gatekit.sites
    assert (site.shortcut, site.first_conv, site.consumer) == ("parameter-free", "conv1.0", "conv2")
    check_guarantees(model, gated)
    # A closed gate removes the whole branch: the first 4 channels are the input, the others zero.
    force_gates(gated, ["closed"], seed=0)
    stem = model.stem(images())
    with torch.no_grad():
        features = gated.head.weight.new_zeros(3, 6)
        features[:, :4] = stem.mean((2, 3))
        torch.testing.assert_close(gated(images()), model.head(features))


def test_fusion_stage_gates_the_blocks_of_each_resolution_and_names_the_fusion_adds():
    model = build(FusionStage)
    gated, caught = convert_quietly(model)
    assert [site.name for site in gated.gatekit.sites] == ["high_block", "low_block"]
    skipped = {site.name: site for site in gated.gatekit.skipped}
    assert len(skipped) == 2 and all(name.startswith("add_") for name in skipped)
    assert {site.kind for site in skipped.values()} <= {USED_OUTSIDE, FUSION}
    (warning,) = caught
    assert all(name in str(warning.message) for name in skipped)
    assert "strict=True" in str(warning.message)
    check_guarantees(model, gated)


def test_blocks_on_split_pieces_are_gated():
    model = build(SplitBlocks)
    gated, caught = convert_quietly(model)
    assert caught == []
    assert [(site.name, site.shortcut) for site in gated.gatekit.sites] == [
        ("block", "identity"), ("add_1", "parameter-free"),  # first + mix(second): one piece the branch, one the shortcut
    ]
    check_guarantees(model, gated)


def test_strict_refuses_and_names_every_block_that_cannot_be_gated():
    with pytest.raises(gatekit.UngatableBlockError, match=r"(?s)2 residual block.*add_.*add_.*exclude"):
        gatekit.convert(build(FusionStage), example_input=images(1), strict=True)
    gated = gatekit.convert(build(PartialResidual), example_input=images(1), strict=True)  # nothing to skip
    assert len(gated.gatekit.sites) == 1


def test_gate_sites_lists_the_skipped_sites_and_patterns_may_name_them():
    model = build(FusionStage)
    sites, skipped = gatekit.gate_sites(model, example_input=images(1), skipped=True)
    assert [site.name for site in sites] == ["high_block", "low_block"]
    assert [site.name for site in skipped] == [site.name for site in convert_quietly(model)[0].gatekit.skipped]
    assert all(site.reason and site.node for site in skipped)
    # Excluding the skipped adds is not an error, and leaves nothing to warn about.
    gated, caught = convert_quietly(model, exclude=[site.name for site in skipped])
    assert caught == [] and len(gated.gatekit.sites) == 2


class OnlyFusion(nn.Module):
    """Its one add joins two paths whose values also go elsewhere: no block can be gated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = conv_bn(2, 4), conv_bn(4, 4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        a = self.a(x)
        return torch.cat([x + self.b(a), a], 1)


def test_no_residual_block_error_only_when_no_site_can_be_gated():
    with pytest.raises(gatekit.NoResidualBlockError, match="(?s)none can be gated.*used outside the branch"):
        gatekit.convert(build(OnlyFusion), example_input=images(1))


def test_a_failure_analysing_one_block_skips_it_with_the_failure_as_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(gatekit.blocks, "gated_path", broken)
    with pytest.raises(gatekit.NoResidualBlockError, match="gatekit failed analysing it.*IndexError"):
        gatekit.convert(build(PartialResidual), example_input=images(1))
    sites, skipped = gatekit.gate_sites(build(FusionStage), example_input=images(1), skipped=True)
    assert sites == [] and {site.kind for site in skipped} >= {INTERNAL}
    with pytest.raises(gatekit.UngatableBlockError, match="IndexError"):
        gatekit.convert(build(FusionStage), example_input=images(1), strict=True)


def test_a_failure_inserting_a_gate_is_a_gatekit_error_naming_block_and_node(monkeypatch):
    convert_module = sys.modules["gatekit.convert"]  # the attribute gatekit.convert is the function

    def broken(graph, nodes, site, *args):
        raise KeyError(site.add_node)

    monkeypatch.setattr(convert_module, "_insert_gate", broken)
    with pytest.raises(gatekit.InternalError, match=r"(?s)block 'high_block', node 'add'.*exclude=\['high_block'\]"):
        convert_quietly(build(FusionStage))


class ReparameterizableBlock(nn.Module):
    """MobileOne's, FastViT's and GhostNetV3's training-time block: parallel branches summed,
    ``scale(x) + conv0(x) + conv1(x) + conv2(x)``, inside a residual block. Each partial sum from the
    second on is a residual add whose branch holds the earlier ones, and all pick the scale conv as
    their gated layer; sparse execution sliced it once per gate and crashed (IndexError)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(2, 6)
        self.scale = conv_bn(6, 6, kernel=1)
        self.convs = nn.ModuleList(conv_bn(6, 6) for _ in range(3))
        self.project = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.scale(x)
        for conv in self.convs:
            out = out + conv(x)
        x = x + self.project(F.relu(out))
        return self.head(x.mean((2, 3)))


def test_nested_adds_that_pick_the_same_layer_gate_it_once_and_keep_every_guarantee():
    model = build(ReparameterizableBlock)
    gated, caught = convert_quietly(model)
    # `add` (scale + conv0) has one conv on each side: no block. add_1 and add_2 (the partial sums
    # after conv1, conv2) and add_3 (x + project(...)) all fall back to the branch's first conv, the
    # scale conv: add_3 holds the others, so it keeps the gate.
    assert [(site.name, site.first_conv) for site in gated.gatekit.sites] == [("add_3", "scale.0")]
    assert [(site.name, site.kind, site.node) for site in gated.gatekit.skipped] == [
        ("add_1", SHARED_LAYER, "scale_0"), ("add_2", SHARED_LAYER, "scale_0"),
    ]
    assert all("block 'add_3'" in site.reason for site in gated.gatekit.skipped)
    (warning,) = caught
    assert "add_1, add_2" in str(warning.message) and SHARED_LAYER in str(warning.message)
    layers = [node for site in gated.gatekit.sites for node, _ in site.sliced_layers]
    assert len(layers) == len(set(layers))  # no layer sliced by two gates
    check_guarantees(model, gated)
