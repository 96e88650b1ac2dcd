"""Sparse execution: the same outputs as the masked model, and exactly the profiler's MACs."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit.adapters import get_model
from test_macs import randomize_gates
from test_zoo import _zoo, input_shape


def randomize_norms(model, seed=1):
    """Random BN statistics and affine terms: timm zero-inits each block's last BN, hiding branches."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.weight.data = torch.rand(size, generator=generator) * 0.5 + 0.5
            module.bias.data = torch.randn(size, generator=generator) * 0.2
            module.running_mean = torch.randn(size, generator=generator) * 0.2
            module.running_var = torch.rand(size, generator=generator) + 1.0
    return model


def gated_zoo_model(name, mode="channel+layer"):
    shape = input_shape(name)
    model = randomize_norms(get_model(name).eval())
    gated = gatekit.convert(model, gates=mode, example_input=torch.randn(1, *shape)).eval()
    randomize_gates(gated)
    images = torch.randn(4, *shape) + 2 * torch.randn(4, shape[0], 1, 1)
    return gated, images


@pytest.mark.parametrize("name", _zoo())
def test_sparse_equals_masked_and_costs_the_profiled_macs(name):
    gated, images = gated_zoo_model(name)
    fast = gatekit.sparse(gated)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), gated(images), atol=1e-4, rtol=1e-4)
        for image in images.split(1):
            expected = gatekit.dynamic_macs(gated) if gated(image) is not None else None
            with FlopCounterMode(display=False) as counter:
                output = fast(image)
            assert counter.get_total_flops() // 2 == expected.item()
            torch.testing.assert_close(output, gated(image), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_single_head_modes(mode):
    gated, images = gated_zoo_model("cifar/resnet20", mode)
    with torch.no_grad():
        torch.testing.assert_close(gatekit.sparse(gated)(images), gated(images), atol=1e-5, rtol=1e-5)


def test_per_sample_strategy_matches_union():
    gated, images = gated_zoo_model("torchvision/resnet18")
    with torch.no_grad():
        union = gatekit.sparse(gated, strategy="union")(images)
        per_sample = gatekit.sparse(gated, strategy="per-sample")(images)
        torch.testing.assert_close(per_sample, union, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(per_sample, gated(images), atol=1e-5, rtol=1e-5)


def set_gates(gated, *, layer=None, channels=None):
    for gate in gatekit.gates_of(gated).values():
        nn.init.zeros_(gate.fc.weight)
        if layer is not None:
            nn.init.constant_(gate.layer_head.bias, 50.0 if layer else -50.0)
        if channels is not None:
            gate.channel_head.bias.data = torch.where(torch.arange(gate.channels) < channels, 50.0, -50.0)


def test_extremes_all_open_all_closed_and_no_channel_left():
    model = randomize_norms(get_model("cifar/resnet20", shortcut="B").eval())
    gated = gatekit.convert(model, example_input=torch.randn(1, 3, 32, 32)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        set_gates(gated, layer=True, channels=10**6)
        torch.testing.assert_close(gatekit.sparse(gated)(images), model(images), atol=1e-5, rtol=1e-5)
        set_gates(gated, layer=False)
        torch.testing.assert_close(gatekit.sparse(gated)(images), gated(images), atol=1e-5, rtol=1e-5)
        set_gates(gated, layer=True, channels=0)  # blocks run, every filter off: the branch is bn2(0)
        torch.testing.assert_close(gatekit.sparse(gated)(images), gated(images), atol=1e-5, rtol=1e-5)


def test_sparse_copies_but_refuses_pickling_with_the_fix():
    gated, images = gated_zoo_model("cifar/resnet8")
    fast = gatekit.sparse(gated)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(fast)(images), fast(images))
    with pytest.raises(gatekit.GatekitError, match="gatekit.save"):
        torch.save(fast, io.BytesIO())


def test_sparse_shares_weights_and_is_inference_only():
    gated, images = gated_zoo_model("cifar/resnet8")
    fast = gatekit.sparse(gated)
    assert fast.get_submodule("conv1").weight is gated.get_submodule("conv1").weight
    with torch.no_grad():
        gated.get_submodule("layer1.0.conv2").weight.mul_(2)
        torch.testing.assert_close(fast(images), gated(images), atol=1e-5, rtol=1e-5)
    with pytest.raises(gatekit.GatekitError, match="inference"):
        fast.train()
    with pytest.raises(gatekit.GatekitError, match="strategy"):
        gatekit.sparse(gated, strategy="fastest")
    with pytest.raises(gatekit.NotConvertedError):
        gatekit.sparse(get_model("cifar/resnet8"))


def test_open_gates_slice_nothing_and_gate_edits_are_seen():
    gated, images = gated_zoo_model("cifar/resnet20")
    set_gates(gated, layer=True, channels=10**6)
    fast = gatekit.sparse(gated)
    with torch.no_grad():
        torch.testing.assert_close(fast(images[:1]), gated(images[:1]), atol=1e-5, rtol=1e-5)
        caches = [m.cache for m in fast.modules() if hasattr(m, "cache")]
        assert caches and all(not cache.entries for cache in caches)  # every filter kept: no slice made
        for gate in gatekit.gates_of(gated).values():  # in place, after the sparse model joined the heads
            gate.layer_head.bias.fill_(-50.0)
        torch.testing.assert_close(fast(images), gated(images), atol=1e-5, rtol=1e-5)
        assert all(not bool(g.layer_gates.any()) for g in gatekit.gates_of(gated).values())


@pytest.mark.parametrize("mode", ["channel", "layer", "channel+layer"])
def test_fused_eval_forward_records_what_gate_forward_records(mode):
    from gatekit._fused_gate import eval_forward

    gated, images = gated_zoo_model("cifar/resnet8", mode)
    for gate in gatekit.gates_of(gated).values():
        x = torch.randn(3, gate.in_channels, 8, 8)
        with torch.no_grad():
            expected = gate(x)
            records = [gate.channel_logits, gate.layer_logits]
            fused = eval_forward(gate, x)
        for got, want in zip((*fused, gate.channel_logits, gate.layer_logits), (*expected, *records)):
            assert (got is None) == (want is None)
            if want is not None:
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
