import copy

import pytest
import torch
from torch import nn

import gatekit
from gatekit.adapters import get_model
from toy_models import InlineResidual, PlainCNN, ToyResNet, Untraceable, DataDependentBlock

X = torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("style", ["plus", "shortcut_first", "torch.add", "iadd", "method"])
def test_every_way_of_writing_the_add_is_found_and_preserved(style):
    model = ToyResNet(style).eval()
    gated = gatekit.convert(model, example_input=X[:1])
    assert [site.name for site in gated.gatekit.sites] == ["blocks.0", "blocks.1"]
    assert all(site.consumer.endswith("conv2") and site.channels == 8 for site in gated.gatekit.sites)
    torch.testing.assert_close(gated(X), model(X), atol=1e-5, rtol=0)


def test_adds_in_the_root_forward_get_unique_names():
    model = InlineResidual().eval()
    gated = gatekit.convert(model, example_input=X[:1])
    assert [site.name for site in gated.gatekit.sites] == ["add", "add_1"]
    assert [site.first_conv for site in gated.gatekit.sites] == ["a1", "b1"]
    torch.testing.assert_close(gated(X), model(X), atol=1e-5, rtol=0)


def test_input_model_is_left_untouched_unless_inplace():
    model = ToyResNet()
    before = copy.deepcopy(model.state_dict())
    gated = gatekit.convert(model, example_input=X[:1])
    gated.train()
    gated(X).sum().backward()
    torch.optim.SGD(gated.parameters(), lr=1.0).step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not any(isinstance(m, gatekit.Gate) for m in model.modules())

    shared = gatekit.convert(model, example_input=X[:1], inplace=True)
    assert shared.get_submodule("blocks.0.conv1").weight is model.blocks[0].conv1.weight


def test_training_mode_and_batch_norm_statistics_survive_conversion():
    model = ToyResNet().train()
    running_mean = model.blocks[0].bn1.running_mean.clone()
    gated = gatekit.convert(model, example_input=X[:1])
    assert gated.training and all(m.training for m in gated.modules())
    assert torch.equal(gated.get_submodule("blocks.0.bn1").running_mean, running_mean)
    assert gatekit.convert(model.eval(), example_input=X[:1]).training is False


@pytest.mark.parametrize("mode, channel, layer", [
    ("channel+layer", True, True), ("channel", True, False), ("layer", False, True)])
def test_gating_modes_create_the_asked_heads(mode, channel, layer):
    gated = gatekit.convert(ToyResNet(), gates=mode, example_input=X[:1])
    gated(X)
    for gate in gatekit.gates_of(gated).values():
        assert (gate.channel_head is not None) == channel and (gate.layer_head is not None) == layer
        assert (gate.channel_gates is not None) == channel and (gate.layer_gates is not None) == layer


def _force(gated, *, layer=None, channel=None):
    """Fix every gate's decisions through its biases (head weights are zero after conversion)."""
    for gate in gatekit.gates_of(gated).values():
        if layer is not None:
            nn.init.constant_(gate.layer_head.bias, 50.0 if layer else -50.0)
        if channel is not None:
            gate.channel_head.bias.data = channel


def test_a_closed_layer_gate_turns_the_block_into_its_shortcut():
    model = ToyResNet(blocks=1).eval()
    gated = gatekit.convert(model, example_input=X[:1]).eval()
    _force(gated, layer=False)
    block_input = model.stem(X)
    expected = model.head(torch.relu(block_input).mean((2, 3)))
    torch.testing.assert_close(gated(X), expected)


def test_closed_channel_gates_equal_zeroing_those_filters():
    model = ToyResNet(blocks=1).eval()
    gated = gatekit.convert(model, example_input=X[:1]).eval()
    keep = torch.tensor([1.0, -1, 1, 1, -1, 1, -1, 1]) * 50
    _force(gated, channel=keep)
    pruned = copy.deepcopy(model)
    # Zeroing a filter's BN output: weight and bias of bn1 to zero for closed channels.
    closed = keep < 0
    pruned.blocks[0].bn1.weight.data[closed] = 0
    pruned.blocks[0].bn1.bias.data[closed] = 0
    torch.testing.assert_close(gated(X), pruned(X), atol=1e-5, rtol=0)


def test_training_gates_are_exactly_binary_and_eval_gates_deterministic():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1], init_bias=0.0)
    gated.train()
    gated(torch.randn(64, 3, 16, 16))
    for gate in gatekit.gates_of(gated).values():
        for decisions in (gate.channel_gates, gate.layer_gates):
            assert set(decisions.unique().tolist()) == {0.0, 1.0}  # bias 0: both values occur
    gated.eval()
    first = [g.channel_gates.clone() for g in (gated(X), *gatekit.gates_of(gated).values())[1:]]
    torch.manual_seed(123)
    second = [g.channel_gates for g in (gated(X), *gatekit.gates_of(gated).values())[1:]]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_include_and_exclude_select_blocks_by_pattern():
    model = get_model("cifar/resnet8")
    x = torch.randn(1, 3, 32, 32)
    names = [site.name for site in gatekit.gate_sites(model, example_input=x)]
    assert names == ["layer1.0", "layer2.0", "layer3.0"]
    assert [s.name for s in gatekit.convert(model, example_input=x, include=["layer2.*"]).gatekit.sites] == ["layer2.0"]
    assert [s.name for s in gatekit.convert(model, example_input=x, exclude=["layer1.*"]).gatekit.sites] == ["layer2.0", "layer3.0"]
    with pytest.raises(gatekit.NoResidualBlockError, match="layer9"):
        gatekit.convert(model, example_input=x, include=["layer9.*"])


def test_default_example_input_is_built_from_the_first_conv():
    sites = gatekit.gate_sites(ToyResNet())
    assert len(sites) == 2 and sites[0].in_channels == 8


def test_plain_cnn_has_no_residual_block():
    with pytest.raises(gatekit.NoResidualBlockError, match="no residual block"):
        gatekit.convert(PlainCNN())


def test_untraceable_module_is_named_with_a_leaf_module_hint():
    with pytest.raises(gatekit.TraceError, match=r"(?s)'body' \(DataDependentBlock\).*leaf_modules"):
        gatekit.convert(Untraceable(), example_input=X[:1])
    # Kept whole as a leaf, the block's add is invisible: no residual block left to gate.
    with pytest.raises(gatekit.NoResidualBlockError):
        gatekit.convert(Untraceable(), example_input=X[:1], leaf_modules=[DataDependentBlock])


def test_converting_twice_is_refused():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1])
    with pytest.raises(gatekit.AlreadyConvertedError, match="already gated"):
        gatekit.convert(gated)


@pytest.mark.parametrize("bad, match", [
    (dict(gates="channels"), "not a gating mode"),
    (dict(example_input=[1, 2]), "must be a tensor"),
    (dict(example_input=torch.randn(1, 5, 16, 16)), r"(?s)'stem'.*shape \(1, 5, 16, 16\).*channels.*example_input"),
])
def test_bad_options_name_the_problem(bad, match):
    with pytest.raises(gatekit.GatekitError, match=match):
        gatekit.convert(ToyResNet(), **{"example_input": X[:1], **bad})


def test_non_module_input_is_refused():
    with pytest.raises(gatekit.GatekitError, match="torch.nn.Module"):
        gatekit.convert(lambda x: x)


def test_functions_that_need_a_gated_model_say_so():
    with pytest.raises(gatekit.NotConvertedError, match="gatekit.convert"):
        gatekit.sparsity_loss(ToyResNet(), layer=1.0)


def test_losses_before_any_forward_say_to_run_the_model():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1])
    with pytest.raises(gatekit.GatekitError, match="run the model"):
        gatekit.gate_stats(gated)


def test_dense_macs_of_resnet20():
    gated = gatekit.convert(get_model("cifar/resnet20"), example_input=torch.randn(1, 3, 32, 32))
    # stem 32*32*16*3*9 = 442,368; stage 1: 6 convs of 32*32*16*16*9 = 2,359,296 each;
    # stage 2: 32*16*9*16*16 (stride 2) = 1,179,648 + 5 convs of 16*16*32*32*9 = 2,359,296;
    # stage 3: 8*8*64*32*9 = 1,179,648 + 5 of 8*8*64*64*9 = 2,359,296; fc 64*10 = 640.
    expected = 442_368 + 6 * 2_359_296 + 2 * (1_179_648 + 5 * 2_359_296) + 640
    assert gated.gatekit.dense_macs == expected == 40_551_040
    first = gated.gatekit.sites[0]
    assert first.branch_macs == first.channel_macs == 2 * 2_359_296


def test_training_decisions_follow_the_seed_and_eval_decisions_ignore_it():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1], init_bias=0.0).train()
    images = torch.randn(32, 3, 16, 16)

    def decisions(seed):
        torch.manual_seed(seed)
        gated(images)
        return [d.clone() for g in gatekit.gates_of(gated).values() for d in (g.channel_gates, g.layer_gates)]

    assert all(torch.equal(a, b) for a, b in zip(decisions(7), decisions(7)))
    assert not all(torch.equal(a, b) for a, b in zip(decisions(7), decisions(8)))
    gated.eval()
    assert all(torch.equal(a, b) for a, b in zip(decisions(7), decisions(8)))


def test_registered_models_are_measured_at_their_registered_input_size():
    gated = gatekit.convert(get_model("mnist/resnet8"))
    assert gated.gatekit.input_shape == (1, 1, 28, 28)
    explicit = gatekit.convert(get_model("mnist/resnet8"), example_input=torch.zeros(1, 1, 28, 28))
    assert gated.gatekit.dense_macs == explicit.gatekit.dense_macs


def test_an_optional_argument_left_at_none_is_traced_as_none():
    """timm's Hiera: ``forward(x, mask=None)`` with ``if mask is not None``; traced as a placeholder,
    the mask branch would enter the graph and fail on the one-input call."""
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x, mask=None):
            x = self.stem(x)
            if mask is not None:
                x = x * mask
            return self.conv(x) + x

    model, x = Masked().eval(), torch.randn(2, 3, 8, 8)
    gated = gatekit.convert(model, example_input=x[:1]).eval()
    assert [site.name for site in gated.gatekit.sites] == ["add"]
    assert torch.allclose(gated(x), model(x), atol=1e-6)
