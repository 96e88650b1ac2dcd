"""Top-k channel gates (``convert(..., channel_keep=...)``, FBS-style): exactly k filters per input and
block, in training and eval, fused or not, sparse or masked, and a channel cost fixed by construction."""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gatekit
from gatekit import GatekitError, gates_of
from gatekit._fused_gate import FusedGate
from gatekit.adapters import get_model
from gatekit.relaxation import top_k, top_k_sigmoid

KEEP = 0.3  # resnet8's blocks have 16, 32 and 64 filters: k = ceil(4.8), ceil(9.6), ceil(19.2) = 5, 10, 20
KEPT = {"layer1.0": 5, "layer2.0": 10, "layer3.0": 20}


def top_k_resnet8(gates: str = "channel+layer", channel_keep: float = KEEP, **options) -> nn.Module:
    model = get_model("cifar/resnet8").eval()
    for module in model.modules():  # batch-norm statistics away from the identity, so masks show in outputs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(1.0, 2.0)
    return gatekit.convert(model, gates=gates, channel_keep=channel_keep,
                           example_input=torch.randn(1, 3, 32, 32), **options)


def randomize_channel_heads(gated: nn.Module, seed: int = 0) -> None:
    """Input-dependent channel logits, so the kept filters differ between samples; layer gates stay open."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates_of(gated).values():
            gate.fc.weight.copy_(torch.randn(gate.fc.weight.shape, generator=generator))
            gate.channel_head.weight.copy_(torch.randn(gate.channel_head.weight.shape, generator=generator))
            gate.channel_head.bias.copy_(torch.randn(gate.channel_head.bias.shape, generator=generator))


def images(batch: int = 6, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=generator) + 2 * torch.randn(batch, 3, 1, 1, generator=generator)


def test_keep_is_the_ceiling_of_the_fraction_and_is_recorded():
    gated = top_k_resnet8()
    assert {name: gate.keep for name, gate in gates_of(gated).items()} == KEPT
    assert gated.gatekit.options["channel_keep"] == KEEP
    assert "channel_keep" not in gatekit.convert(get_model("cifar/resnet8")).gatekit.options
    # 0.3 * 10 is 3.0000000000000004 in floating point: still 3 filters, not 4; a tiny fraction keeps 1.
    assert gatekit.convert(get_model("cifar/resnet8", widths=[10, 10, 10]), channel_keep=0.3,
                           example_input=torch.randn(1, 3, 32, 32)).gatekit_gates.layer1_0.keep == 3
    assert {gate.keep for gate in gates_of(top_k_resnet8(channel_keep=1e-3)).values()} == {1}
    assert all(gate.keep is None for gate in gates_of(gatekit.convert(get_model("cifar/resnet8"))).values())


@pytest.mark.parametrize("gates", ["channel", "channel+layer"])
@pytest.mark.parametrize("noise", [1.0, 0.0])
def test_exactly_k_filters_per_sample_and_block_in_training_and_eval(gates, noise):
    gated = top_k_resnet8(gates)
    randomize_channel_heads(gated)
    gatekit.set_noise(gated, noise)
    x = images()
    for train in (True, False):
        gated.train(train)
        with torch.no_grad():
            gated(x)
        for name, gate in gates_of(gated).items():
            decisions = gate.channel_gates
            assert decisions.shape == (x.shape[0], gate.channels)
            assert bool(((decisions == 0) | (decisions == 1)).all())
            assert decisions.sum(1).tolist() == [KEPT[name]] * x.shape[0], (name, train)
            if gates == "channel+layer":
                assert gate.layer_gates is not None  # the layer head is unchanged
    # The kept filters differ between samples: the decisions depend on the input.
    assert any(len({tuple(row.tolist()) for row in gate.channel_gates}) > 1 for gate in gates_of(gated).values())


def test_training_at_noise_zero_keeps_what_eval_keeps_and_noise_changes_it():
    gated = top_k_resnet8()
    randomize_channel_heads(gated)
    x = images()
    with torch.no_grad():
        gated.eval()(x)
        evaluated = [gate.channel_gates.clone() for gate in gates_of(gated).values()]
        gatekit.set_noise(gated, 0.0)
        gated.gatekit_gates.train()  # the gates only: batch norms in training mode would change their inputs
        gated(x)
        assert all(torch.equal(gate.channel_gates, want) for gate, want in zip(gates_of(gated).values(), evaluated))
        gatekit.set_noise(gated, 1.0)
        torch.manual_seed(0)
        gated(x)
        assert any(not torch.equal(gate.channel_gates, want) for gate, want in zip(gates_of(gated).values(), evaluated))


def test_the_decisions_are_the_k_largest_logits():
    gated = top_k_resnet8().eval()
    randomize_channel_heads(gated)
    with torch.no_grad():
        gated(images())
    for gate in gates_of(gated).values():
        kept_logits = gate.channel_logits.masked_fill(gate.channel_gates == 0, math.inf).min(1).values
        closed_logits = gate.channel_logits.masked_fill(gate.channel_gates == 1, -math.inf).max(1).values
        assert bool((kept_logits >= closed_logits).all())


def test_fused_eval_path_decides_what_the_unfused_path_decides(monkeypatch):
    gated = top_k_resnet8().eval()
    randomize_channel_heads(gated)
    x = images(8)
    with torch.no_grad():
        fused_output = gated(x)
        fused = {name: (gate.channel_gates.clone(), gate.channel_logits.clone(), gate.layer_gates.clone())
                 for name, gate in gates_of(gated).items()}
        inputs = {}
        hooks = [gate.register_forward_pre_hook(lambda g, a, name=name: inputs.__setitem__(name, a[0]))
                 for name, gate in gates_of(gated).items()]
        monkeypatch.setattr("gatekit.gate._exporting", lambda x: True)  # what tracing and ONNX export run
        unfused_output = gated(x)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(unfused_output, fused_output)
    for name, gate in gates_of(gated).items():
        channel_gates, channel_logits, layer_gates = fused[name]
        torch.testing.assert_close(gate.channel_logits, channel_logits)
        assert torch.equal(gate.channel_gates, channel_gates)
        assert torch.equal(gate.layer_gates, layer_gates)
        # The sparse blocks' decisions (bool, channels then the layer decision) are the same too.
        decisions = FusedGate(gate).decisions(inputs[name])
        assert torch.equal(decisions[:, : gate.channels], channel_gates.bool())
        assert torch.equal(decisions[:, -1], layer_gates.bool())


def test_straight_through_gradient_reaches_the_channel_head():
    logits = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    (top_k_sigmoid(logits, 5, temperature=2.0, noise=0.0) * upstream).sum().backward()
    relaxed = torch.sigmoid(logits.detach() / 2.0)
    torch.testing.assert_close(logits.grad, upstream * relaxed * (1 - relaxed) / 2.0)

    gated = top_k_resnet8().train()
    randomize_channel_heads(gated)
    nn.functional.cross_entropy(gated(images()), torch.arange(6) % 10).backward()
    for name, gate in gates_of(gated).items():
        assert gate.channel_head.weight.grad is not None and gate.channel_head.weight.grad.abs().sum() > 0, name


def static_top_k_macs(gated: nn.Module) -> int:
    """Per-sample MACs of the network every input runs with each layer gate open: the dense cost with
    each block's gated layers (its ``channel_macs``, proportional to the gated filters) scaled from C
    filters to k, plus the gates' own MACs."""
    info = gated.gatekit
    total = info.dense_macs
    for site in info.sites:
        gate = gated.gatekit_gates[site.name.replace(".", "_")]
        assert site.channel_macs % site.channels == 0  # each gated filter costs the same
        total += site.channel_macs // site.channels * gate.keep - site.channel_macs + gate.macs
    return total


def test_profiled_and_dynamic_macs_equal_the_static_cost_of_k_filters_per_block():
    gated = top_k_resnet8()
    randomize_channel_heads(gated)
    expected = static_top_k_macs(gated)
    # layer1.0: 16 filters, 5 kept; its gated layers (conv1's outputs, conv2's inputs) cost
    # 2 x 32x32 x 16 x 16x9 = 4,718,592 MACs with all 16, 294,912 per filter.
    assert gated.gatekit.sites[0].channel_macs == 2 * 32 * 32 * 16 * 16 * 9
    report = gatekit.profile(gated, images(8), batch_size=4)
    assert set(report.per_sample_macs) == {expected}
    assert [block.channel_rate for block in report.blocks] == pytest.approx([5 / 16, 10 / 32, 20 / 64])
    with torch.no_grad():
        gated.eval()(images(3))
    assert gatekit.dynamic_macs(gated).tolist() == [expected] * 3
    # The losses' cost figures agree: the channel cost is a constant, exact (expected_macs once the
    # layer gates are open with probability 1, not sigmoid(3)).
    assert gatekit.deployed_macs(gated).tolist() == [float(expected)] * 3
    with torch.no_grad():
        for gate in gates_of(gated).values():
            gate.layer_head.bias.fill_(50.0)
        gated(images(3))
    torch.testing.assert_close(gatekit.expected_macs(gated), torch.full((3,), float(expected)))


@pytest.mark.parametrize("strategy", ["union", "per-sample"])
def test_sparse_equals_masked_and_costs_the_dynamic_macs(strategy):
    from torch.utils.flop_counter import FlopCounterMode

    gated = top_k_resnet8().eval()
    randomize_channel_heads(gated)
    x = images()
    fast = gatekit.sparse(gated, strategy=strategy)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), gated(x), atol=1e-4, rtol=1e-4)
        for image in x.split(1)[:2]:
            gated(image)
            expected = gatekit.dynamic_macs(gated).item()
            with FlopCounterMode(display=False) as counter:
                output = fast(image)
            assert counter.get_total_flops() // 2 == expected
            torch.testing.assert_close(output, gated(image), atol=1e-4, rtol=1e-4)


def test_save_and_load_keep_channel_keep(tmp_path):
    gated = top_k_resnet8().eval()
    randomize_channel_heads(gated)
    gatekit.save(gated, tmp_path / "top_k.pt")
    loaded = gatekit.load(tmp_path / "top_k.pt")
    assert loaded.gatekit.options["channel_keep"] == KEEP
    assert {name: gate.keep for name, gate in gates_of(loaded).items()} == KEPT
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gated(x))
    assert all(torch.equal(a.channel_gates, b.channel_gates)
               for a, b in zip(gates_of(loaded).values(), gates_of(gated).values()))


def test_warm_start_keeps_the_k_best_scored_filters():
    gated = top_k_resnet8()
    scores = {name: torch.randn(gate.channels) for name, gate in gates_of(gated).items()}
    cost = gatekit.warm_start(gated, 0.5, scores=scores)
    assert cost == pytest.approx(static_top_k_macs(gated) / gated.gatekit.dense_macs)
    with torch.no_grad():
        gated.eval()(images(3))
    for name, gate in gates_of(gated).items():
        best = torch.zeros(gate.channels).index_fill_(0, scores[name].argsort(descending=True)[: gate.keep], 1.0)
        assert torch.equal(gate.channel_gates, best.expand(3, -1))
    # Below the cost channel_keep sets, only layer gates could save the rest: with none it is an error.
    assert gatekit.warm_start(top_k_resnet8(), 0.2) == pytest.approx(cost)
    with pytest.raises(GatekitError, match="channel_keep=0.3.*no layer gates"):
        gatekit.warm_start(top_k_resnet8("channel"), 0.2)


def test_compact_folds_a_warm_started_top_k_model_to_k_filters_per_block():
    gated = top_k_resnet8("channel")
    gatekit.warm_start(gated, 1.0)
    x = images()
    small = gatekit.compact(gated.eval(), x)
    assert [block.filters_kept for block in small.gatekit_compaction.blocks] == list(KEPT.values())
    assert small.gatekit_compaction.differing_samples == 0
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_and_torchscript_trace_keep_the_top_k_decisions(tmp_path, dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript" if dynamo else "onnx")
    from gatekit.export import to_onnx

    gated = top_k_resnet8().eval()
    randomize_channel_heads(gated)
    x = images(5)
    with torch.no_grad():
        expected = gated(x)
    path = to_onnx(gated, tmp_path / "top_k.onnx", dynamo=dynamo)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-4)
    if dynamo:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(gated, x[:2])
    torch.testing.assert_close(traced(x), expected)


def test_top_k_decisions_helper():
    assert top_k(torch.tensor([[0.5, -1.0, 2.0, 0.1]]), 2).tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert top_k(torch.zeros(2, 3), 3).tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("channel_keep", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "half", True])
def test_bad_channel_keep_is_refused_with_the_fix(channel_keep):
    with pytest.raises(GatekitError, match=r"channel_keep=.*a number in \(0, 1\]"):
        gatekit.convert(get_model("cifar/resnet8"), channel_keep=channel_keep)


def test_channel_keep_without_channel_gates_is_refused():
    with pytest.raises(GatekitError, match="gates='layer' has no channel gates.*gates='channel\\+layer'"):
        gatekit.convert(get_model("cifar/resnet8"), gates="layer", channel_keep=0.5)
    with pytest.raises(GatekitError, match="keep=0"):
        gatekit.Gate(16, 16, keep=0)


def test_train_example_passes_channel_keep_to_convert(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train

    args = train.parse_args(["--out", "x", "--method", "channel", "--channel-keep", "0.5", "--model", "cifar/resnet8"])
    model = train.build_model(args)
    assert model.gatekit.options["channel_keep"] == 0.5
    assert [gate.keep for gate in gates_of(model).values()] == [8, 16, 32]
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--method", "layer", "--target", "0.5", "--channel-keep", "0.5"])
    assert "use --method dlcg or channel" in capsys.readouterr().err
