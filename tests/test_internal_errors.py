"""No internal exception reaches the user from sparse execution, dynamic MACs or profiling: a
failure inside gatekit is an InternalError naming the step, the block and the node, with a way
around it (issue 14). Each test breaks one internal function and checks what the user sees.
"""
from __future__ import annotations

import sys

import pytest
from torch import nn

import gatekit
from test_partial_blocks import FusionStage, build, convert_quietly, images

# The package attributes gatekit.sparse, gatekit.dynamic_macs and gatekit.profile are the functions.
SPARSE, DYNAMIC_MACS, PROFILER = (sys.modules[f"gatekit.{name}"] for name in ("sparse", "dynamic_macs", "profiler"))
NAMES_FIRST_BLOCK = r"block 'high_block', node 'add'\).*KeyError.*exclude=\['high_block'\]"


def broken(*args, **kwargs):
    raise KeyError("a lookup gatekit did not expect to fail")


@pytest.fixture
def gated() -> nn.Module:
    return convert_quietly(build(FusionStage))[0]


def test_a_failure_building_a_sparse_block_names_block_and_node(gated, monkeypatch):
    monkeypatch.setattr(SPARSE, "_branch_graph", broken)
    with pytest.raises(gatekit.InternalError, match=rf"(?s)building the sparse block \({NAMES_FIRST_BLOCK}"):
        gatekit.sparse(gated)


def test_a_gatekit_error_building_a_sparse_block_passes_unchanged(gated, monkeypatch):
    def refuses(*args, **kwargs):
        raise gatekit.GatekitError("a reason given on purpose")

    monkeypatch.setattr(SPARSE, "_branch_graph", refuses)
    with pytest.raises(gatekit.GatekitError, match="^a reason given on purpose$") as caught:
        gatekit.sparse(gated)
    assert type(caught.value) is gatekit.GatekitError


def test_a_failure_counting_dynamic_macs_names_block_and_node(gated, monkeypatch):
    gated(images())
    monkeypatch.setattr(DYNAMIC_MACS, "executed_layers", broken)
    with pytest.raises(gatekit.InternalError, match=rf"(?s)counting dynamic MACs \({NAMES_FIRST_BLOCK}"):
        gatekit.dynamic_macs(gated)


def test_a_failure_nesting_blocks_in_dynamic_macs_is_an_internal_error(gated, monkeypatch):
    gated(images())
    monkeypatch.setattr(DYNAMIC_MACS, "own_branch_macs", broken)
    with pytest.raises(gatekit.InternalError, match=r"counting dynamic MACs \(node 'the blocks nested"):
        gatekit.dynamic_macs(gated)


def test_a_failure_adding_up_a_profile_names_block_and_node(gated, monkeypatch):
    monkeypatch.setattr(PROFILER, "executed_channels", broken)
    with pytest.raises(gatekit.InternalError, match=rf"(?s)adding up the blocks' rates \({NAMES_FIRST_BLOCK}"):
        gatekit.profile(gated, images())


@pytest.mark.parametrize("function, step", [("measure_costs", "measuring the blocks' MACs"), ("static_macs", "counting the dense model's MACs")])
def test_a_failure_measuring_macs_in_a_profile_is_an_internal_error(gated, monkeypatch, function, step):
    model = gated if function == "measure_costs" else build(FusionStage)
    monkeypatch.setattr(PROFILER, function, broken)
    with pytest.raises(gatekit.InternalError, match=rf"{step} \(node 'its layers, at input shape \(2, 8, 8\)'\)"):
        gatekit.profile(model, images())
