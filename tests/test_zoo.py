"""Every registered model through the same checks: blocks found, function kept, original untouched,
gradients reach every gate, and gate decisions are binary (eval: deterministic).

Models registered at 224 x 224 run at 64 x 64 to keep CI fast; the others at their registered size.
The largest models only run with ``-m slow``.
"""
from __future__ import annotations

import copy
import re

import pytest
import timm.models.resnet
import torch
import torchvision.models.resnet
from torch import Tensor, nn

import gatekit
from gatekit.adapters import cifar_resnet, get_model, list_models, model_entry, timm_resnet, torchvision_resnet

SLOW = {
    "torchvision/resnet101", "torchvision/resnet152", "torchvision/wide_resnet101_2",
    "torchvision/resnext101_32x8d", "cifar/resnet110", "mnist/resnet110",
}
# Checked independently of the graph: the residual block classes each family defines.
RESIDUAL_BLOCKS = (
    torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck,
    timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck,
    cifar_resnet.BasicBlock,
)
# Blocks per stage by depth, from the papers' tables (ResNet-26 is timm's 2-2-2-2 bottleneck net).
STAGES = {
    18: (2, 2, 2, 2), 26: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}
BATCH = 2


FAMILIES = ("cifar", "mnist")  # with the ResNets below: the built-in ResNet adapters; others may add any model
# The other registered families (MobileNet, EfficientNet, RegNet, ConvNeXt, ...) have no depth in
# their names and blocks of other classes: test_coverage.py checks them.
RESNETS = [f"torchvision/{name}" for name in torchvision_resnet.MODELS] + [f"timm/{name}" for name in timm_resnet.MODELS]


def _zoo() -> list:
    names = [name for family in FAMILIES for name in list_models(f"{family}/*")] + RESNETS
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


def expected_block_count(name: str) -> int:
    """Blocks from the depth in the name: 3 stages of (depth - 2) / 6 for CIFAR, the table for ImageNet."""
    family, model = name.split("/")
    depth = int(re.search(r"\d+", model).group())  # wide_resnet50_2 -> 50, seresnext26d_32x4d -> 26
    if family in ("cifar", "mnist"):
        return 3 * (depth - 2) // 6
    return sum(STAGES[depth])


def input_shape(name: str) -> tuple[int, ...]:
    channels, height, width = model_entry(name).input_size
    return (channels, 64, 64) if (height, width) == (224, 224) else (channels, height, width)


def inputs(name: str, batch_size: int = BATCH, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_shape(name), generator=generator)


def _convert(name: str) -> tuple[nn.Module, dict[str, Tensor], nn.Module]:
    """(original in eval mode, a copy of its state before conversion, the converted model)."""
    torch.manual_seed(0)
    original = get_model(name).eval()
    before = {key: value.clone() for key, value in original.state_dict().items()}
    gated = gatekit.convert(original, example_input=inputs(name, batch_size=1))
    return original, before, gated



@pytest.fixture(scope="module")
def converted(request) -> tuple[str, nn.Module, dict[str, Tensor], nn.Module]:
    """The model named by the parameter, converted once; module scope makes pytest run every check
    of one model before building the next, so one model at a time stays in memory."""
    return (request.param, *_convert(request.param))


@pytest.fixture
def zoo_model(converted) -> tuple[str, nn.Module, dict[str, Tensor], nn.Module]:
    """A fresh copy of the converted model for each check, since training forwards move its batch-norm statistics."""
    name, original, before, gated = converted
    copied = copy.deepcopy(gated)
    return name, original, before, copied


zoo = pytest.mark.parametrize("converted", _zoo(), indirect=True)


def test_deepcopy_keeps_gate_info():
    _, _, gated = _convert("cifar/resnet8")
    assert copy.deepcopy(gated).gatekit.sites == gated.gatekit.sites


@zoo
def test_finds_every_residual_block(zoo_model):
    name, original, _, gated = zoo_model
    blocks = [path for path, module in original.named_modules() if isinstance(module, RESIDUAL_BLOCKS)]
    assert len(blocks) == expected_block_count(name)
    assert [site.name for site in gated.gatekit.sites] == blocks


@zoo
def test_channel_gate_sits_between_first_conv_and_its_consumer(zoo_model):
    _, original, _, gated = zoo_model
    for site in gated.gatekit.sites:
        block = original.get_submodule(site.name)
        assert site.first_conv == f"{site.name}.conv1"
        assert site.consumer == f"{site.name}.conv2"
        assert site.channels == block.conv1.out_channels
        assert site.in_channels == block.conv1.in_channels


@zoo
def test_open_gates_keep_the_function(zoo_model):
    name, original, _, gated = zoo_model
    x = inputs(name)
    with torch.no_grad():
        expected, actual = original(x), gated.eval()(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5


@zoo
def test_original_is_left_untouched(zoo_model):
    _, original, before, _ = zoo_model
    after = original.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not any(isinstance(module, gatekit.Gate) for module in original.modules())
    assert not hasattr(original, "gatekit")


@zoo
def test_every_gate_parameter_gets_a_gradient(zoo_model):
    name, _, _, gated = zoo_model
    torch.manual_seed(0)
    output = gated.train()(inputs(name))
    (output.sum() + gatekit.sparsity_loss(gated, layer=0.1, channel=0.1)).backward()
    assert [name for name, p in gated.named_parameters() if p.grad is None] == []
    for block, gate in gatekit.gates_of(gated).items():
        for parameter_name, parameter in gate.named_parameters():
            assert parameter.grad is not None, f"{block}: {parameter_name} has no gradient"
            assert torch.isfinite(parameter.grad).all(), f"{block}: {parameter_name} gradient not finite"
        # The heads start at zero weights, so only they, not the shared layer, move at once. A block
        # skipped for the whole batch (probability sigmoid(-3)^2) rightly leaves its channel head still.
        moving_heads = [gate.layer_head] + ([gate.channel_head] if gate.layer_gates.any() else [])
        for head in moving_heads:
            assert any(p.grad.abs().sum() > 0 for p in head.parameters()), f"{block}: head gradient is zero"


def _decisions(gated: nn.Module) -> list[Tensor]:
    return [
        decisions.detach().clone()
        for gate in gatekit.gates_of(gated).values()
        for decisions in (gate.channel_gates, gate.layer_gates)
    ]


@zoo
def test_gates_are_binary_in_training_and_deterministic_in_eval(zoo_model):
    name, _, _, gated = zoo_model
    x = inputs(name)
    torch.manual_seed(0)
    with torch.no_grad():
        gated.train()(x)
    training = _decisions(gated)
    assert all(((d == 0) | (d == 1)).all() for d in training)
    assert training[0].shape == (BATCH, gated.gatekit.sites[0].channels)
    assert training[1].shape == (BATCH,)
    with torch.no_grad():
        gated.eval()(x)
        first = _decisions(gated)
        gated(x)
        second = _decisions(gated)
    assert all(((d == 0) | (d == 1)).all() for d in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
