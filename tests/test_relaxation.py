import math

import pytest
import torch

from gatekit.relaxation import gumbel_sigmoid, threshold


@pytest.mark.parametrize("logit", [-2.0, 0.0, 1.5])
def test_gates_are_on_with_probability_sigmoid_of_the_logit(logit):
    gates = gumbel_sigmoid(torch.full((200_000,), logit))
    # Binomial standard error at n = 200,000 is at most 0.0011; 0.006 is more than five of them.
    assert abs(gates.mean().item() - 1 / (1 + math.exp(-logit))) < 0.006


def test_forward_is_exactly_binary_and_backward_is_the_relaxed_gradient():
    logits = torch.randn(1000, requires_grad=True)
    torch.manual_seed(1)
    gates = gumbel_sigmoid(logits, temperature=0.5)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    gates.sum().backward()
    torch.manual_seed(1)
    relaxed_logits = logits.detach().clone().requires_grad_()
    gumbel_sigmoid(relaxed_logits, temperature=0.5, hard=False).sum().backward()
    torch.testing.assert_close(logits.grad, relaxed_logits.grad)
    assert (logits.grad >= 0).all() and (logits.grad > 0).float().mean() > 0.5


def test_lower_temperature_gives_sharper_relaxed_samples():
    logits = torch.zeros(10_000)
    torch.manual_seed(0)
    warm = gumbel_sigmoid(logits, temperature=5.0, hard=False)
    torch.manual_seed(0)
    cold = gumbel_sigmoid(logits, temperature=0.1, hard=False)
    assert (cold - 0.5).abs().mean() > (warm - 0.5).abs().mean()


def test_threshold_is_deterministic_at_one_half():
    assert threshold(torch.tensor([-0.1, 0.0, 0.1])).tolist() == [0.0, 0.0, 1.0]
