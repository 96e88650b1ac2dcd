"""The C gate kernel (gatekit/_gate_kernel.c): the same records as the torch path, and only where it may run."""
import copy
import pickle
import shutil
import sysconfig

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit._fused_gate import ALL_ON, PENDING, FusedGate, eval_forward, kernel_available
from gatekit.gate import Gate, apply_channel_gate, apply_layer_gate
from toy_models import ToyResNet

X = torch.randn(4, 3, 16, 16)

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="gatekit was installed without a C compiler")
HEADS = {"channel": dict(layer_head=False), "layer": dict(channel_head=False), "channel+layer": {}}


def random_gate(heads: str, in_channels: int = 12, channels: int = 7) -> Gate:
    gate = Gate(in_channels, channels, **HEADS[heads]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return gate


def records(gate: Gate, x: torch.Tensor, *, grad: bool) -> list[torch.Tensor | None]:
    with torch.set_grad_enabled(grad):
        returned = gate(x)
    return [*returned, gate.channel_logits, gate.layer_logits]


def test_kernel_is_built_where_a_c_compiler_is():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    assert kernel_available(), "pip install built gatekit without its gate kernel: see the build log"


@needs_kernel
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "3d", "5d"])
@pytest.mark.parametrize("batch", [1, 5])
def test_kernel_records_equal_the_torch_path(heads, layout, batch):
    gate = random_gate(heads)
    shapes = {"contiguous": (batch, 12, 6, 5), "channels_last": (batch, 12, 6, 5), "3d": (batch, 12, 9), "5d": (batch, 12, 2, 3, 4)}
    x = torch.randn(shapes[layout]) + torch.randn(batch, 12, *[1] * (len(shapes[layout]) - 2))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert FusedGate(gate).kernel_arguments(x) is not None
    fast, reference = records(gate, x, grad=False), records(gate, x, grad=True)
    assert reference[2] is None or reference[2].grad_fn is not None  # with autograd: the torch path
    for got, want in zip(fast, reference):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    # Decisions by hand (paper Fig. 2): pool, fc, ReLU, heads, logit > 0.
    hidden = torch.relu(gate.fc(x.flatten(2).mean(2)))
    for head, decisions in ((gate.channel_head, fast[0]), (gate.layer_head, fast[1])):
        if head is not None:
            assert torch.equal(decisions, (head(hidden) > 0).float().reshape(decisions.shape))


@needs_kernel
def test_kernel_runs_only_where_it_may():
    gate = random_gate("channel+layer")
    fused = FusedGate(gate)
    x = torch.randn(2, 12, 4, 4)
    with torch.no_grad():
        assert fused.kernel_arguments(x) is not None
        assert fused.kernel_arguments(x.transpose(2, 3)) is None  # neither contiguous nor channels last
        assert fused.kernel_arguments(x.double()) is None
        assert fused.kernel_arguments(x[:, :6]) is None  # the wrong width: the torch path raises
        assert fused.kernel_arguments(x[1:]) is not None  # contiguous at an offset into its storage
        torch.testing.assert_close(records(gate, x[1:], grad=False)[2], records(gate, x[1:], grad=True)[2].detach())
        with pytest.raises(RuntimeError):
            gate(x[:, :6])
        with FlopCounterMode(display=False) as counter:  # a dispatch mode must see the matrix products
            assert fused.kernel_arguments(x) is None
            gate(x)
        assert counter.get_total_flops() == 2 * 2 * gate.macs
    assert fused.kernel_arguments(x) is None  # autograd on: the kernel has no backward
    with torch.no_grad():
        torch.testing.assert_close(records(gate, x.transpose(2, 3), grad=False)[2],
                                   records(gate, x.transpose(2, 3), grad=True)[2].detach())


@needs_kernel
def test_kernel_sees_edited_and_replaced_parameters():
    gate = random_gate("channel+layer")
    x = torch.randn(3, 12, 4, 4)
    with torch.no_grad():
        gate.layer_head.bias.fill_(-100.0)  # in place
        assert not gate(x)[1].any()
        gate.layer_head.bias.data = torch.full((1,), 100.0)  # replaced
        assert gate(x)[1].all()
        gate.fc.weight.data = gate.fc.weight.data.t().contiguous().t()  # a layout the kernel cannot read
        assert FusedGate(gate).kernel_arguments(x) is None
        torch.testing.assert_close(records(gate, x, grad=False)[2], records(gate, x, grad=True)[2].detach())
    gate = random_gate("channel+layer")
    with torch.no_grad():
        assert FusedGate(gate).kernel_arguments(x) is not None
        gate.channel_head.weight.data = torch.randn(3, 16)  # a shape the kernel would read past
        assert FusedGate(gate).kernel_arguments(x) is None
        with pytest.raises((RuntimeError, IndexError)):  # the torch path finds the shapes disagree
            gate(x)


@needs_kernel
def test_open_gates_are_marked_and_not_applied():
    gate = random_gate("channel+layer")
    x = torch.randn(2, 12, 4, 4)
    branch = torch.randn(2, 7, 4, 4)
    with torch.no_grad():
        gate.channel_head.bias.fill_(100.0)
        gate.layer_head.bias.fill_(100.0)
        channel_gates, layer_gates = gate(x)
        assert getattr(channel_gates, ALL_ON) and getattr(layer_gates, ALL_ON)
        assert apply_channel_gate(branch, channel_gates) is branch and apply_layer_gate(branch, layer_gates) is branch
        gate.channel_head.bias[3] = -100.0
        channel_gates, _ = gate(x)
        assert not getattr(channel_gates, ALL_ON, False)
        assert torch.equal(apply_channel_gate(branch, channel_gates)[:, 3], torch.zeros(2, 4, 4))
    with torch.enable_grad():  # the torch path marks nothing
        assert not any(getattr(g, ALL_ON, False) for g in gate(x))


def test_open_gated_model_still_computes_the_original():
    model = ToyResNet().eval()
    gated = gatekit.convert(model, example_input=X[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(X), model(X), atol=0, rtol=0)  # x * 1 skipped or not: bit for bit


@needs_kernel
def test_nan_inputs_close_gates_as_the_torch_path_does():
    gate = random_gate("channel+layer")
    x = torch.randn(2, 12, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    fast, reference = records(gate, x, grad=False), records(gate, x, grad=True)
    for got, want in zip(fast[:2], reference[:2]):
        assert torch.equal(got, want)
    assert not fast[0][0].any() and not fast[1][0]


@needs_kernel
def test_eval_forward_with_top_k_keeps_k_filters():
    gate = Gate(12, 7, keep=3).eval()
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.normal_()
        channel_gates, _ = eval_forward(gate, torch.randn(4, 12, 5, 5))
    assert torch.equal(channel_gates.sum(1), torch.full((4,), 3.0))


@needs_kernel
def test_records_are_built_when_read_and_are_those_of_the_last_forward():
    gate = random_gate("channel+layer")
    with torch.no_grad():  # every gate on: the records wait until read
        gate.channel_head.bias.add_(100.0)
        gate.layer_head.bias.add_(100.0)
    x, other = torch.randn(3, 12, 4, 4), torch.randn(3, 12, 4, 4)
    reference = records(gate, x, grad=True)
    with torch.no_grad():
        gate(x)
    assert PENDING in gate.__dict__
    for got, want in zip([gate.channel_gates, gate.layer_gates, gate.channel_logits, gate.layer_logits], reference):
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    assert PENDING not in gate.__dict__
    with torch.no_grad():
        gate(other)
    gate.channel_gates = None  # one record written: the other three are still the last forward's
    torch.testing.assert_close(gate.layer_logits, records(gate, other, grad=True)[3].detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        gate(other)
    gate.train()
    gate(x)  # a training forward after a pending one records its own
    assert gate.channel_logits.grad_fn is not None and PENDING not in gate.__dict__
    gate.eval()
    with torch.no_grad():
        gate(x)
    for copied in (copy.deepcopy(gate), pickle.loads(pickle.dumps(gate))):  # copies start without records
        assert copied.channel_logits is None and copied.layer_gates is None


@needs_kernel
def test_decisions_the_whole_batch_agrees_on_are_shared_until_written_to():
    gate = random_gate("channel+layer")
    x = torch.randn(3, 12, 4, 4)
    with torch.no_grad():
        gate.channel_head.bias.fill_(100.0)
        gate.layer_head.bias.fill_(-100.0)
        first, second = gate(x), gate(x)
    assert first[0] is second[0] and first[1] is second[1]
    assert torch.equal(first[0], torch.ones(3, 7)) and torch.equal(first[1], torch.zeros(3))
    assert getattr(first[0], ALL_ON) and not getattr(first[1], ALL_ON, False)
    assert gate.channel_gates is not first[0] and torch.equal(gate.channel_gates, first[0])
    with torch.inference_mode():
        first[0].mul_(0)  # written to: not handed out again
        third = gate(x)
        assert third[0] is not first[0] and torch.equal(third[0], torch.ones(3, 7))
        assert gate(x[:2])[0].shape == (2, 7)
        large = torch.randn(600, 12, 2, 2)  # 4,200 decisions: each call gets its own
        assert gate(large)[0] is not gate(large)[0] and getattr(gate(large)[0], ALL_ON)
        # The layer logit becomes relu(mean of input channel 0) - 0.5: on for samples 0 and 2 only.
        gate.fc.weight.zero_()
        gate.fc.weight[0, 0] = 1.0
        gate.fc.bias.zero_()
        gate.layer_head.weight.zero_()
        gate.layer_head.weight[0, 0] = 1.0
        gate.layer_head.bias.fill_(-0.5)
        x[:, 0] = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)
        mixed = gate(x)[1]  # on for some samples only: the record itself
        assert torch.equal(mixed, torch.tensor([1.0, 0.0, 1.0])) and mixed is gate.layer_gates
