"""torch.compile of a masked gated model: one graph, eager outputs, eager gradients, gate state for the losses.

The test uses the aot_eager backend: it runs the same Dynamo capture and AOT autograd as inductor
without generating C++, which takes minutes on the CI machine. benchmarks/compile_speed.py measures
inductor.
"""
import torch
from torch import nn

import gatekit
from toy_models import ToyResNet

X = torch.randn(8, 3, 16, 16)


def gated_with_mixed_decisions():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1], regularizer=gatekit.SparsityLoss(layer=0.1, channel=0.1))
    for gate in gatekit.gates_of(gated).values():
        for head in (gate.channel_head, gate.layer_head):
            nn.init.normal_(head.weight, std=2.0)
            nn.init.zeros_(head.bias)
    return gated


def train_step(model, gated, seed):
    torch.manual_seed(seed)  # the same Gumbel noise in both runs
    output = model(X)
    loss = output.square().mean() + gatekit.gate_loss(gated)
    gated.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in gated.named_parameters()}
    return output.detach(), loss.detach(), grads, gatekit.gate_stats(gated)


def test_compiled_masked_model_matches_eager_in_train_and_eval_mode():
    torch._dynamo.reset()
    gated = gated_with_mixed_decisions()
    compiled = torch.compile(gated, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    gated.train()
    eager_output, eager_loss, eager_grads, eager_stats = train_step(gated, gated, seed=1)
    output, loss, grads, stats = train_step(compiled, gated, seed=1)
    torch.testing.assert_close(output, eager_output)
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], msg=name)
    assert stats == eager_stats and any(0 < s.channel_rate < 1 for s in stats.values())

    gated.eval()
    with torch.no_grad():
        expected = gated(X)
        expected_gates = [gate.channel_gates for gate in gatekit.gates_of(gated).values()]
        gated(X[:3])  # leaves decisions for 3 samples on the gates
        torch.testing.assert_close(compiled(X), expected)
    # the compiled forward set the gates' state, which the losses and statistics read
    for gate, gates in zip(gatekit.gates_of(gated).values(), expected_gates):
        assert torch.equal(gate.channel_gates, gates)
