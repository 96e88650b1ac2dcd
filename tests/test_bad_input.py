"""Unusual and wrong input: each case gives a correct result or a GatekitError naming the fix.

Other files cover some already: tests/test_convert.py (bad options, untraceable models),
tests/test_checkpoint.py (damaged and malicious files), tests/test_cli.py (command-line input).
"""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit.adapters import get_model
from test_macs import randomize_gates
from test_sparse import randomize_norms
from toy_models import ToyResNet

X = torch.randn(4, 3, 16, 16) + 2 * torch.randn(4, 3, 1, 1)  # per-image offsets vary the gates


def gated_resnet8(**options):
    model = randomize_norms(get_model("cifar/resnet8", shortcut="B").eval())
    gated = gatekit.convert(model, example_input=X[:1], **options).eval()
    randomize_gates(gated)
    return model, gated


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {m: m.training for m in model.modules()}


def assert_unchanged(model, before):
    tensors, modes = before
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    assert {m: m.training for m in model.modules()} == modes


@pytest.mark.parametrize("call", [
    lambda bad: gatekit.convert(bad),
    lambda bad: gatekit.gate_sites(bad),
    lambda bad: gatekit.profile(bad, X),
    lambda bad: gatekit.sparse(bad),
    lambda bad: gatekit.save(bad, "never-written.pt"),
    lambda bad: gatekit.dynamic_macs(bad),
    lambda bad: gatekit.gate_stats(bad),
    lambda bad: gatekit.param_groups(bad),
    lambda bad: gatekit.sparsity_loss(bad, layer=0.1),
], ids=["convert", "gate_sites", "profile", "sparse", "save", "dynamic_macs", "gate_stats", "param_groups", "loss"])
@pytest.mark.parametrize("bad", ["resnet8", lambda x: x, None], ids=["str", "function", "None"])
def test_non_module_input_is_named(call, bad):
    with pytest.raises(gatekit.GatekitError, match=type(bad).__name__):
        call(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_convert_train_profile_and_run_sparse(dtype):
    model = ToyResNet().eval().to(dtype)
    images = X.to(dtype)
    gated = gatekit.convert(model, example_input=images[:1], regularizer=gatekit.SparsityLoss(layer=0.1, channel=0.1))
    assert all(p.dtype == dtype for p in gated.parameters())
    assert torch.equal(gated.eval()(images), model(images))  # open gates multiply by exactly 1
    gated.train()
    (gated(images).float().sum() + gatekit.gate_loss(gated)).backward()
    assert all(p.grad is not None for g in gatekit.gates_of(gated).values() for p in g.parameters())
    gated.eval()
    randomize_gates(gated)
    with torch.no_grad():
        gated.to(torch.float32)  # the reference: the same weights in float32
        reference = gatekit.profile(gated, X)
        gated.to(dtype)
        assert gatekit.profile(gated, images).dense_macs == reference.dense_macs
        torch.testing.assert_close(gatekit.sparse(gated)(images), gated(images), atol=2e-2, rtol=2e-2)


def test_an_example_input_of_another_dtype_or_device_is_named():
    model = ToyResNet().to(torch.bfloat16)
    with pytest.raises(gatekit.GatekitError, match=r"parameters are torch.bfloat16 on cpu, the example input torch.float32"):
        gatekit.convert(model, example_input=X[:1])
    with pytest.raises(gatekit.GatekitError, match=r"example input torch.float32 on meta"):
        gatekit.convert(ToyResNet(), example_input=X[:1].to("meta"))


def test_a_model_on_the_meta_device_converts_without_memory_then_loads_weights():
    """The big-model workflow: build and convert on 'meta', then materialise and load weights."""
    reference = gatekit.convert(ToyResNet(), example_input=X[:1]).eval()
    with torch.device("meta"):
        skeleton = ToyResNet()
    gated = gatekit.convert(skeleton, example_input=X[:1].to("meta"))
    assert gated.gatekit.sites == reference.gatekit.sites
    assert gated.gatekit.dense_macs == reference.gatekit.dense_macs
    assert all(p.is_meta for p in gated.parameters())
    gated = gated.to_empty(device="cpu").eval()
    gated.load_state_dict(reference.state_dict())
    assert torch.equal(gated(X), reference(X))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_this_machine_lacks_is_named(tmp_path):
    _, gated = gated_resnet8()
    with pytest.raises(gatekit.GatekitError, match="device='cuda' cannot be used on this machine"):
        gatekit.profile(gated, X, device="cuda")


def test_malformed_or_foreign_devices_are_named():
    _, gated = gated_resnet8()
    with pytest.raises(gatekit.GatekitError, match="device='tpu9' cannot be used"):
        gatekit.profile(gated, X, device="tpu9")
    with pytest.raises(gatekit.GatekitError, match=r"parameters are on cpu: move the model first"):
        gatekit.profile(gated, X, device="meta")


def test_channels_last_models_and_inputs_give_the_same_results():
    model, gated = gated_resnet8()
    layout = dict(memory_format=torch.channels_last)
    channels_last = gatekit.convert(copy.deepcopy(model).to(**layout), example_input=X[:1].contiguous(**layout)).eval()
    channels_last.load_state_dict(gated.state_dict())
    assert channels_last.get_submodule("conv1").weight.is_contiguous(**layout)
    images = X.contiguous(**layout)
    with torch.no_grad():
        for inputs in (X, images):
            torch.testing.assert_close(channels_last(inputs), gated(X), atol=1e-5, rtol=1e-5)
            assert torch.equal(gatekit.dynamic_macs(channels_last), gatekit.dynamic_macs(gated))
            torch.testing.assert_close(gatekit.sparse(channels_last)(inputs), gated(X), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(gatekit.sparse(gated)(inputs), gated(X), atol=1e-4, rtol=1e-4)
        assert gatekit.profile(channels_last, images).per_sample_macs == gatekit.profile(gated, X).per_sample_macs


def test_a_batch_of_one_trains_profiles_and_runs_sparse():
    _, gated = gated_resnet8(regularizer=gatekit.SparsityLoss(layer=0.1, channel=0.1))
    gated.train()
    (gated(X[:1]).sum() + gatekit.gate_loss(gated)).backward()
    stats = gatekit.gate_stats(gated)
    assert all(s.execution_rate in (0.0, 1.0) for s in stats.values())
    gated.eval()
    one_by_one = gatekit.profile(gated, X, batch_size=1)
    assert one_by_one.per_sample_macs == gatekit.profile(gated, X, batch_size=4).per_sample_macs
    fast = gatekit.sparse(gated)
    with torch.no_grad():
        for image in X.split(1):
            expected = gatekit.dynamic_macs(gated) if gated(image) is not None else None
            with FlopCounterMode(display=False) as counter:
                fast(image)
            assert counter.get_total_flops() // 2 == expected.item()


@pytest.mark.parametrize("mode", ["channel+layer", "channel", "layer"])
def test_an_empty_batch_runs_but_losses_and_statistics_refuse_it(mode):
    _, gated = gated_resnet8(gates=mode, regularizer=gatekit.SparsityLoss(layer=0.1, channel=0.1))
    empty = X[:0]
    with torch.no_grad():
        assert gatekit.sparse(gated)(empty).shape == (0, 10)
    for training in (False, True):
        assert gated.train(training)(empty).shape == (0, 10)
        assert gatekit.dynamic_macs(gated).shape == (0,)
        assert gatekit.expected_macs(gated).shape == (0,)
        # Means over no sample are NaN: a loss of NaN would silently ruin every weight.
        computations = [gatekit.gate_loss, gatekit.gate_stats, lambda m: gatekit.mac_budget_loss(m, budget=0.5)]
        computations += [lambda m: gatekit.target_rate_loss(m, target=0.5)] if "layer" in mode else []
        for computed in computations:
            with pytest.raises(gatekit.GatekitError, match="empty batch"):
                computed(gated)
    batches = [empty, X[:3], empty, X[3:]]  # empty batches in a loader are skipped
    assert gatekit.profile(gated.eval(), batches).per_sample_macs == gatekit.profile(gated, X).per_sample_macs


def test_nan_input_is_refused_where_it_would_make_mac_counts_wrong():
    """A NaN input gives NaN gate logits, which read as closed gates: a silently low MAC count.
    Outputs stay NaN for that sample only, in the gated and the sparse model alike; counting refuses."""
    _, gated = gated_resnet8()
    images = X.clone()
    images[1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        output = gated(images)
        assert output[1].isnan().all() and not output[[0, 2, 3]].isnan().any()
        torch.testing.assert_close(gatekit.sparse(gated)(images), output, atol=1e-4, rtol=1e-4, equal_nan=True)
    with pytest.raises(gatekit.GatekitError, match=r"sample\(s\) \[1\].*NaN gate logits"):
        gatekit.dynamic_macs(gated)
    with pytest.raises(gatekit.GatekitError, match=r"NaN gate logits.*isfinite"):
        gatekit.profile(gated, images)


@pytest.mark.parametrize("frozen", ["network", "gates"])
def test_frozen_parameters_stay_out_of_the_optimizer_and_unchanged(frozen):
    model = ToyResNet()
    if frozen == "network":
        model.requires_grad_(False)
    gated = gatekit.convert(model, example_input=X[:1], init_bias=0.0,
                            regularizer=gatekit.SparsityLoss(layer=0.5, channel=0.5)).train()
    gates = gatekit.gates_of(gated)
    if frozen == "gates":
        for gate in gates.values():
            gate.requires_grad_(False)
    network_group, gate_group = gatekit.param_groups(gated)
    assert (len(network_group["params"]) == 0) == (frozen == "network")
    assert (len(gate_group["params"]) == 0) == (frozen == "gates")
    optimizer = torch.optim.SGD(gatekit.param_groups(gated), lr=0.5)
    before = {name: p.clone() for name, p in gated.named_parameters()}
    loss = nn.functional.cross_entropy(gated(X), torch.zeros(4, dtype=torch.long)) + gatekit.gate_loss(gated)
    loss.backward()
    optimizer.step()
    for name, parameter in gated.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, before[name]) and parameter.grad is None, name
    assert any(not torch.equal(p, before[n]) for n, p in gated.named_parameters() if p.requires_grad)


def test_batch_norms_held_in_eval_during_finetuning():
    model = ToyResNet().train()
    model.blocks[0].bn1.eval()  # set before conversion: the gated model keeps it
    gated = gatekit.convert(model, example_input=X[:1], init_bias=0.0, regularizer=gatekit.SparsityLoss(layer=0.1))
    assert gated.training and not gated.get_submodule("blocks.0.bn1").training
    assert gated.get_submodule("blocks.0.bn2").training and all(g.training for g in gatekit.gates_of(gated).values())
    norms = [m for m in gated.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:  # the usual way: after .train(), put the norms back in eval mode
        norm.eval()
    statistics = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    optimizer = torch.optim.SGD(gatekit.param_groups(gated), lr=0.1)
    decisions = []
    for _ in range(3):
        loss = gated(X).square().mean() + gatekit.gate_loss(gated)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decisions.append(gatekit.gates_of(gated)["blocks.0"].channel_gates.clone())
    assert all(torch.equal(n.running_mean, m) and torch.equal(n.running_var, v) for n, (m, v) in zip(norms, statistics))
    assert not all(torch.equal(decisions[0], d) for d in decisions[1:]), "gates still sample in training"


def test_a_model_in_training_can_be_deep_copied_and_pickled():
    """EMA and best-so-far copies deepcopy the model mid-training, when the gates hold the last
    forward's tensors with their autograd history (which deepcopy refuses)."""
    gated = gatekit.convert(ToyResNet(), example_input=X[:1]).train()
    gated(X).sum()
    for copied in (copy.deepcopy(gated), pickle.loads(pickle.dumps(gated))):
        assert copied.gatekit.sites == gated.gatekit.sites
        assert all(g.layer_gates is None for g in gatekit.gates_of(copied).values())  # it has not run yet
        assert torch.equal(copied.eval()(X), gated.eval()(X))


def test_nothing_the_user_passes_is_modified(tmp_path):
    model = randomize_norms(get_model("cifar/resnet8").train())
    model_before, example = state_of(model), X[:1].clone()
    gated = gatekit.convert(model, example_input=example).train()
    randomize_gates(gated)
    gatekit.gate_sites(model, example_input=example)
    assert_unchanged(model, model_before)
    assert torch.equal(example, X[:1])

    gated_before, data = state_of(gated), X.clone()
    gatekit.profile(gated, data)
    fast = gatekit.sparse(gated)  # shares the gated model's layers, and leaves their modes alone
    fast.eval()
    gatekit.save(gated, tmp_path / "gated.pt")
    assert_unchanged(gated, gated_before)
    assert torch.equal(data, X)
    assert_unchanged(model, model_before)
    with torch.no_grad(), pytest.raises(gatekit.GatekitError, match=r"training mode.*gated.eval\(\)"):
        fast(data)  # its batch norms would use batch statistics
    with pytest.raises(gatekit.GatekitError, match="inference"):
        fast.train()
    assert_unchanged(gated, gated_before)
    with torch.no_grad():
        expected = gated.eval()(data)
        torch.testing.assert_close(fast(data), expected, atol=1e-4, rtol=1e-4)
