"""Architecture coverage: benchmarks/coverage.py's checks on every model it lists, at 32 x 32, and
where the gates go in each family, checked against the families' own block classes.

The ResNets also run through test_zoo.py and test_sparse.py, so here they only run with ``-m slow``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import timm.models.convnext
import timm.models.regnet
import timm.models.resnetv2
import torch
import torchvision.models.convnext
import torchvision.models.regnet
from torch import nn

import gatekit
from gatekit.adapters import get_model


def _load_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"
    spec = importlib.util.spec_from_file_location("gatekit_coverage", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


coverage = _load_script()
SLOW = {
    "torchvision/resnet18", "torchvision/resnet50", "torchvision/wide_resnet50_2", "torchvision/resnext50_32x4d",
    "timm/resnet50d", "timm/seresnext26d_32x4d", "torchvision/vgg11",
}
SIZE = 32
NEW_FAMILIES = [name for name in coverage.MODELS if name not in SLOW]


def _params(names):
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


@pytest.mark.parametrize("name", _params(coverage.MODELS + coverage.NO_RESIDUAL))
def test_model_passes_every_coverage_check(name):
    result = coverage.check(name, size=SIZE)
    assert result.status.startswith("ok"), result
    if name in coverage.NO_RESIDUAL:
        assert result.status == "ok: no residual block"
        return
    assert result.blocks > 0 and result.channels > 0
    # Conv and linear layers never fall back to full width, or sparse MACs would not match the profile.
    assert not {"Conv2d", "Linear"} & set(result.fallbacks)


def test_no_residual_block_error_says_what_to_gate():
    with pytest.raises(gatekit.NoResidualBlockError, match="no residual block.*VGG"):
        gatekit.convert(coverage.build("torchvision/shufflenet_v2_x0_5"), example_input=torch.randn(1, 3, SIZE, SIZE))


# The families' own residual blocks, found without the graph: torchvision's inverted residuals and
# timm's say whether they add their input (use_res_connect, has_skip); the others always do.
ALWAYS_RESIDUAL = (
    torchvision.models.convnext.CNBlock, torchvision.models.regnet.ResBottleneckBlock,
    timm.models.convnext.ConvNeXtBlock, timm.models.regnet.Bottleneck, timm.models.resnetv2.PreActBottleneck,
    timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck,
)


def residual_blocks(model: nn.Module) -> list[str]:
    return [
        path for path, module in model.named_modules()
        if isinstance(module, ALWAYS_RESIDUAL)
        or getattr(module, "use_res_connect", False) or getattr(module, "has_skip", False)
    ]


def _sites(name):
    model = get_model(name).eval()
    return model, gatekit.gate_sites(model, example_input=torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_every_residual_block_is_found_and_its_channels_reach_a_consumer(name):
    model, sites = _sites(name)
    assert [site.name for site in sites] == residual_blocks(model)
    assert all(site.consumer is not None for site in sites), [site.name for site in sites if site.consumer is None]


def _is_depthwise(module):
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


@pytest.mark.parametrize("name", [n for n in NEW_FAMILIES if "mobilenet" in n or "efficientnet" in n])
def test_inverted_residuals_gate_the_expanded_channels_through_the_depthwise_conv(name):
    model, sites = _sites(name)
    for site in sites:
        gated, consumer = model.get_submodule(site.first_conv), model.get_submodule(site.consumer)
        modules = [model.get_submodule(op) for op in site.channelwise_ops if "." in op]  # "." : a module path
        depthwise = [module for module in modules if _is_depthwise(module)]
        if _is_depthwise(gated):  # no expansion: the depthwise conv makes the channels the projection reads
            assert site.channels == site.in_channels and not depthwise
        else:  # the expansion conv's outputs, through the depthwise conv (and any squeeze-excitation)
            assert gated.kernel_size == (1, 1) and site.channels == gated.out_channels > site.in_channels
            assert len(depthwise) == 1 and depthwise[0].out_channels == site.channels
        assert consumer.kernel_size == (1, 1) and consumer.in_channels == site.channels
        assert consumer.out_channels == site.in_channels  # the projection back to the block's width


@pytest.mark.parametrize("name", [n for n in NEW_FAMILIES if "convnext" in n])
def test_convnext_gates_the_channels_between_its_pointwise_layers(name):
    model, sites = _sites(name)
    for site in sites:
        gated, consumer = model.get_submodule(site.first_conv), model.get_submodule(site.consumer)
        assert not _is_depthwise(gated)  # not the 7x7 depthwise conv before the norm
        assert site.channels == 4 * site.in_channels
        pointwise = [nn.Linear] if isinstance(gated, nn.Linear) else [nn.Conv2d]
        assert isinstance(gated, tuple(pointwise)) and isinstance(consumer, tuple(pointwise))
        width = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
        assert width == site.channels
        assert site.channel_dim == (-1 if isinstance(gated, nn.Linear) else 1)


@pytest.mark.parametrize("name", [n for n in NEW_FAMILIES if "reg" in n or "resnet" in n])
def test_bottlenecks_gate_their_first_conv_before_the_3x3(name):
    model, sites = _sites(name)
    for site in sites:
        gated, consumer = model.get_submodule(site.first_conv), model.get_submodule(site.consumer)
        assert gated.in_channels == site.in_channels and gated.out_channels == site.channels
        assert consumer.kernel_size == (3, 3) and consumer.in_channels == site.channels  # grouped in RegNet


def test_squeeze_excitation_on_gated_channels_is_sliced_with_them():
    _, sites = _sites("torchvision/efficientnet_b0")
    roles = dict(sites[0].sliced_layers)
    squeeze = {name: role for name, role in roles.items() if "fc" in name}
    assert sorted(squeeze.values()) == ["consumer", "first"]  # fc1 reads the gated channels, fc2 makes them
    assert sites[0].channel_gate_node.endswith("block_1_2")  # the mask goes before the SE reads them


def test_stochastic_depth_still_drops_branches_when_the_gated_model_trains():
    from torchvision.ops import StochasticDepth

    model = get_model("torchvision/efficientnet_b0", stochastic_depth_prob=0.99).eval()
    gated = gatekit.convert(model, example_input=torch.randn(1, 3, SIZE, SIZE))  # converted in eval mode
    modules = [n.target for n in gated.graph.nodes if n.op == "call_module"]
    kept_whole = [target for target in modules if isinstance(gated.get_submodule(target), StochasticDepth)]
    # One per residual block, each a module, not a call frozen into the graph as `training=False`.
    assert len(kept_whole) == len(residual_blocks(model)) == 9
    assert gated.get_submodule(kept_whole[-1]).train()(torch.ones(8, 2)).eq(0).any()


TIMM_SAMPLE = coverage._timm_families.representatives(timm.list_models(pretrained=False))


@pytest.mark.parametrize("family", coverage._timm_families.CI_SAMPLE)
def test_timm_family_sample_converts_and_passes_every_check(family):
    """benchmarks/coverage.py --timm-families on a fixed sample: the issue-14 patterns (ReXNet's
    partial residual, HRNet's fusion, Res2Net's splits) and two plain residual CNNs."""
    result = coverage.check_timm_family(family, TIMM_SAMPLE[family], size=SIZE)
    assert result.outcome == "ok", result
    assert result.gated > 0 and result.dense_macs_equal and result.dynamic_macs_equal
    if family == "hrnet":  # fusion adds are named and skipped; the blocks of each resolution are gated
        assert result.skip_reasons.keys() <= {"fusion of parallel paths", "branch value used outside the branch"}
        assert result.skipped > 0
    if family == "lcnetv2":  # nested partial sums of one block's parallel branches: the outer one keeps the gate
        assert result.skip_reasons.get("gated layer shared with another block", 0) > 0


def test_timm_families_resume_keeps_the_recorded_rows_and_runs_only_the_others(tmp_path, monkeypatch):
    """A stopped --timm-families run resumes (--resume) and reruns named families (--families)."""
    FamilyResult = coverage._timm_families.FamilyResult
    monkeypatch.setattr(coverage._timm_families, "representatives", lambda names: {"a": "a1", "b": "b1", "c": "c1"})
    ran = []

    def check(family, model, *, size, seconds):
        ran.append(family)
        return FamilyResult(family, model, outcome="ok", gated=1, seconds=1.0)

    monkeypatch.setattr(coverage, "check_timm_family", check)
    output, page = tmp_path / "families.json", tmp_path / "coverage.md"
    first = dict(command="python benchmarks/coverage.py --timm-families", machine={},
                 results=[dataclasses.asdict(FamilyResult("a", "a1", outcome="crash", seconds=2.0))])
    output.write_text(json.dumps(first))
    threads = torch.get_num_threads()

    def run(*options):
        monkeypatch.setattr(sys, "argv", ["coverage.py", "--timm-families", "--resume", "--output", str(output),
                                          "--markdown", str(page), *options])
        try:
            coverage.main()
        finally:
            torch.set_num_threads(threads)

    with pytest.raises(SystemExit):  # family a still crashes
        run()
    assert ran == ["b", "c"]
    record = json.loads(output.read_text())
    assert [r["family"] for r in record["results"]] == ["a", "b", "c"] and record["parts"] == 2
    text = page.read_text()
    assert "`python benchmarks/coverage.py --timm-families` (in 2 runs" in text  # the first run's command
    assert "Partial run" not in text and "still fail:** a." in text and "in\n4 s" in text  # 2 s recorded + 1 s + 1 s
    run("--families", "a")
    assert ran == ["b", "c", "a"]
    assert "still fail:** none." in page.read_text() and json.loads(output.read_text())["parts"] == 3
