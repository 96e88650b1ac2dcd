"""Fuzzing: random residual networks convert, keep their function, and sparse == masked == counted MACs.

Hypothesis draws networks (tests/random_resnets.py): depth, widths, strides, identity / projection /
subsampling shortcuts, every way of writing the add, containers nested several ways (one module
called twice included), pre- and post-activation, scaled branches (constant, layer scale), plain,
bottleneck (grouped), inverted and one-conv branches, squeeze-excitation, dropout, residual
blocks nested in a branch, shortcuts added to a channel slice of the branch, blocks meeting
torch.split/chunk, branch values read outside the branch, and HRNet-like fusion of parallel paths
ending in a torch.cat. Each must convert with one gate per block that can be gated (one warning
naming the others), compute what it computed before (gates open), and, with gates forced open,
closed or random per sample, give
``gatekit.sparse`` outputs equal to the masked model's, at the MACs ``gatekit.dynamic_macs`` counts
(FlopCounterMode / 2 on the sparse model, batch 1). Derandomized, so CI runs the same examples.
"""
import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from random_resnets import ADDS, CONTAINERS, SCALES, BlockSpec, NetSpec, build, expected_shortcuts, expected_skipped

FORCINGS = ("open", "closed", "no_channels", "some_channels", "per_sample")


@st.composite
def block_specs(draw, cin):
    stride = draw(st.sampled_from([1, 1, 2]))
    width = draw(st.one_of(st.just(cin), st.integers(2, 10)))
    branch = draw(st.sampled_from(["basic", "basic", "bottleneck", "inverted", "single"]))
    # A one-conv branch beside a one-conv projection is two equal paths, by design no residual block.
    shortcuts = ["projection"] if branch != "single" else []
    shortcuts += ["subsample"] if width >= cin else []
    shortcuts += ["identity"] * 2 if stride == 1 and width == cin else []
    shortcuts += ["partial"] if stride == 1 and width > cin else []
    if not shortcuts:
        width, shortcuts = max(width, cin), ["subsample"]
    shortcut = draw(st.sampled_from(shortcuts))
    # Splitting off a piece keeps the block's width: only around an identity block of 2+ channels.
    splits = ["none", "none", "inside"] + (["piece"] if shortcut == "identity" and cin >= 2 else [])
    # alpha scales the branch slice only, so a partial add with alpha has no full-width equivalent.
    adds = [a for a in ADDS if a != "torch.add_alpha"] if shortcut == "partial" else ADDS
    add = draw(st.sampled_from(adds))
    return BlockSpec(
        width=width, stride=stride, branch=branch, shortcut=shortcut, add=add, scale=draw(st.sampled_from(SCALES)), preact=draw(st.booleans()),
        groups=draw(st.sampled_from([1, 2])) if branch == "bottleneck" else 1,
        sequential_branch=draw(st.booleans()), nested=draw(st.sampled_from([False, False, True])),
        squeeze_excite=draw(st.sampled_from([False, False, True])), dropout=draw(st.sampled_from([False, False, True])),
        split=draw(st.sampled_from(splits)),
        # fx records `branch += shortcut` as an out-of-place add: a later read of the branch would see
        # the value before the add in the traced graph, after it in eager mode.
        leak=draw(st.sampled_from([False] * 5 + [True])) if add != "iadd" else False,
    )


@st.composite
def net_specs(draw):
    in_channels, stem = draw(st.integers(1, 3)), draw(st.integers(2, 8))
    stages, cin = [], stem
    for _ in range(draw(st.integers(1, 2))):
        blocks = []
        for _ in range(draw(st.integers(1, 3))):
            blocks.append(draw(block_specs(cin)))
            cin = blocks[-1].width
        stages.append(tuple(blocks))
    return NetSpec(
        in_channels=in_channels, stem=stem, stages=tuple(stages),
        containers=tuple(draw(st.sampled_from(CONTAINERS)) for _ in stages),
        outer=draw(st.sampled_from(["sequential", "modulelist"])), size=draw(st.integers(5, 11)),
        seed=draw(st.integers(0, 2**16)),
    )


def force_gates(gated, forcings, seed):
    """Set each gate's decisions: open, closed, no channel, a fixed channel subset, or random per sample.

    ``forcings`` is cycled over the gates in graph order. Saturated biases (+-50) fix a decision for
    every input; ``per_sample`` gives random head weights so that decisions vary with the input.
    """
    generator = torch.Generator().manual_seed(seed)
    for index, gate in enumerate(gatekit.gates_of(gated).values()):
        forcing = forcings[index % len(forcings)]
        layer_bias = torch.tensor([-50.0 if forcing == "closed" else 50.0])
        channel_bias = torch.full((gate.channels,), -50.0 if forcing == "no_channels" else 50.0)
        if forcing == "some_channels":
            channel_bias = torch.where(torch.rand(gate.channels, generator=generator) < 0.5, 50.0, -50.0)
        spread = 2.0 if forcing == "per_sample" else 0.0  # how much the decisions follow the input
        if forcing == "per_sample":
            layer_bias, channel_bias = torch.randn(1, generator=generator), torch.randn(gate.channels, generator=generator)
        gate.fc.weight.data = torch.randn(gate.fc.weight.shape, generator=generator) * spread
        for head, bias in ((gate.layer_head, layer_bias), (gate.channel_head, channel_bias)):
            if head is not None:
                head.weight.data = torch.randn(head.weight.shape, generator=generator) * spread
                head.bias.data = bias.clone()


def images_for(spec, count=3):
    generator = torch.Generator().manual_seed(spec.seed + 1)
    shape = (count, spec.in_channels, spec.size, spec.size)
    # Per-image offsets make per-sample gates differ between images.
    return torch.randn(shape, generator=generator) + 2 * torch.randn(count, spec.in_channels, 1, 1, generator=generator)


def check_network(spec, mode, forcings):
    model = build(spec)
    images = images_for(spec)
    before = copy.deepcopy(model.state_dict())
    if not expected_shortcuts(spec):  # every residual add leaks: nothing to gate, and it says so
        with pytest.raises(gatekit.NoResidualBlockError, match="none can be gated"):
            gatekit.convert(model, gates=mode, example_input=images[:1])
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = gatekit.convert(model, gates=mode, example_input=images[:1]).eval()
    skipped_warnings = [w for w in caught if issubclass(w.category, gatekit.SkippedBlocksWarning)]
    assert len(skipped_warnings) == (expected_skipped(spec) > 0)
    assert len(gated.gatekit.skipped) == expected_skipped(spec)
    assert all(site.name in str(skipped_warnings[0].message) for site in gated.gatekit.skipped)

    assert [site.shortcut for site in gated.gatekit.sites] == expected_shortcuts(spec)
    with torch.no_grad():
        torch.testing.assert_close(gated(images), model(images), atol=1e-5, rtol=1e-5)
        assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items()), "convert changed its input"

        force_gates(gated, forcings, spec.seed)
        fast = gatekit.sparse(gated)
        torch.testing.assert_close(fast(images), gated(images), atol=1e-4, rtol=1e-4)
        for image in images.split(1):
            masked = gated(image)
            expected = gatekit.dynamic_macs(gated).item()
            with FlopCounterMode(display=False) as counter:
                output = fast(image)
            assert counter.get_total_flops() // 2 == expected
            torch.testing.assert_close(output, masked, atol=1e-4, rtol=1e-4)
            if "per_sample" not in forcings:  # saturated gates: the expectation is the count
                torch.testing.assert_close(gatekit.expected_macs(gated).item(), float(expected), rtol=1e-6, atol=0)


modes = st.sampled_from(["channel+layer", "channel+layer", "channel", "layer"])
forcing_lists = st.lists(st.sampled_from(FORCINGS), min_size=1, max_size=4)


def one_stage(*blocks, **options):
    return NetSpec(in_channels=2, stem=4, stages=(blocks,), containers=("sequential",), **options)


# Issue 14's patterns, each on its own: a shortcut added to the branch's first channels (ReXNet),
# blocks meeting split/chunk, a branch value read after the add, and an HRNet-like fusion stage.
@example(
    spec=one_stage(BlockSpec(width=6, shortcut="partial", add="iadd"), BlockSpec(width=6, split="piece")),
    mode="channel+layer", forcings=["per_sample", "closed"],
)
@example(
    spec=NetSpec(
        in_channels=2, stem=4, stages=((BlockSpec(width=4, split="inside", nested=True),), (BlockSpec(width=4, leak=True),)),
        containers=("fusion", "inline"),
    ),
    mode="channel+layer", forcings=["some_channels", "closed", "per_sample"],
)
@example(spec=one_stage(BlockSpec(width=4, leak=True)), mode="layer", forcings=["open"])
# Regressions: each example failed before the fix named in its comment.
@example(  # sparse KeyError: a layer-scale parameter is read inside the branch but is not on the path
    # from the block input; the branch copy now brings such constants along (sparse._branch_graph).
    spec=one_stage(BlockSpec(width=4, scale="layer_scale")), mode="channel+layer", forcings=["per_sample"],
)
@example(  # no channel on: sparse ran one channel and masked it, costing MACs dynamic_macs did not
    # count; the sliced layers now take an empty channel set (_sliced._no_channel_output).
    spec=one_stage(
        BlockSpec(width=4), BlockSpec(width=4, branch="bottleneck", groups=2), BlockSpec(width=4, branch="inverted"),
        BlockSpec(width=6, branch="single", shortcut="subsample"),
    ),
    mode="channel+layer", forcings=["no_channels"],
)
@example(  # "channel" mode, branch ending on its gated channels (conv-BN): sparse took the shortcut
    # for the branch (sparse._branch_index looked through the layer gate only) and ran it densely.
    spec=one_stage(BlockSpec(width=4, branch="single", add="iadd")), mode="channel", forcings=["some_channels"],
)
@example(  # a residual block nested in another's branch: sparse refused it, and dynamic and expected
    # MACs counted the inner branch twice and its gate where the outer block was skipped (_nesting.py).
    spec=one_stage(BlockSpec(width=4, nested=True), BlockSpec(width=4, nested=True, preact=True)),
    mode="channel+layer", forcings=["closed", "open", "per_sample", "closed"],
)
@example(  # the gated layer is a grouped conv (a nested block takes the bottleneck's conv1 output, so
    # conv2 is gated): sparse ran it at full width; it now computes the active filters group by group.
    spec=one_stage(BlockSpec(width=4, branch="bottleneck", groups=2, nested=True)),
    mode="channel+layer", forcings=["open", "some_channels"],
)
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=net_specs(), mode=modes, forcings=forcing_lists)
def test_random_residual_networks(spec, mode, forcings):
    check_network(spec, mode, forcings)
