import math

import pytest
import torch
from torch import nn

import gatekit
from gatekit import GatekitError, gates_of
from gatekit.adapters import get_model
from gatekit.losses import (
    BatchShapingLoss, MacBudgetLoss, SparsityLoss, TargetRateLoss, batch_shaping_loss, expected_macs,
    mac_budget_loss, sparsity_loss, target_rate_loss,
)
from gatekit.dynamic_macs import dynamic_macs
from gatekit.losses._beta import beta_cdf
from gatekit.macs import measure_costs

BATCH = 8



def gated_resnet8(gates: str = "channel+layer", **options) -> nn.Module:
    return gatekit.convert(
        get_model("cifar/resnet8"), gates=gates, example_input=torch.randn(1, 3, 32, 32), **options
    )


def images(batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def heads(model):
    for gate in gates_of(model).values():
        for head in (gate.channel_head, gate.layer_head):
            if head is not None:
                yield head


def force_gates(model, bias: float) -> None:
    """Make every gate's logit ``bias`` for every input."""
    with torch.no_grad():
        for head in heads(model):
            head.weight.zero_()
            head.bias.fill_(bias)


def randomize_gates(model) -> None:
    """Input-dependent logits around zero, so gates differ between samples and between gates."""
    with torch.no_grad():
        for head in heads(model):
            head.weight.normal_(0, 1)
            head.bias.normal_(0, 0.5)


def run_randomized(gates: str = "channel+layer", **options):
    model = gated_resnet8(gates, **options).train()
    randomize_gates(model)
    model(images())
    return model


def gate_macs(model) -> int:
    return sum(gate.macs for gate in gates_of(model).values())


# --- Beta CDF -------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, beta, closed_form", [
    (1.0, 1.0, lambda x: x),
    (2.0, 1.0, lambda x: x**2),
    (1.0, 2.0, lambda x: 1 - (1 - x) ** 2),
    (0.5, 0.5, lambda x: 2 / math.pi * torch.asin(x.sqrt())),
])
def test_beta_cdf_matches_closed_forms(alpha, beta, closed_form):
    # 101 points cross (a + 1) / (a + b + 2), where the continued fraction switches to the mirrored side.
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(beta_cdf(x, alpha, beta), closed_form(x), atol=1e-12, rtol=0)


def test_beta_cdf_matches_the_integral_of_the_pdf():
    alpha, beta = 3.5, 2.5
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    pdf = grid ** (alpha - 1) * (1 - grid) ** (beta - 1) / math.exp(
        math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    )
    integral = torch.cumulative_trapezoid(pdf, grid)
    points = torch.arange(20_000, 200_001, 20_000)
    torch.testing.assert_close(beta_cdf(grid[points], alpha, beta), integral[points - 1], atol=1e-8, rtol=0)


def test_beta_cdf_keeps_dtype_and_is_exact_at_the_ends():
    cdf = beta_cdf(torch.tensor([0.0, 0.3, 1.0]), 0.6, 0.4)
    assert cdf.dtype == torch.float32
    assert cdf[0].item() == 0.0 and cdf[2].item() == 1.0 and 0 < cdf[1].item() < 1


@pytest.mark.parametrize("alpha, beta", [(0.6, 0.4), (2.5, 7.0), (1.0, 1.0)])
def test_beta_cdf_gradient_is_the_pdf(alpha, beta):
    x = (torch.rand(16, dtype=torch.float64) * 0.96 + 0.02).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: beta_cdf(t, alpha, beta), (x,))


def test_beta_cdf_gradient_stays_finite_at_saturated_probabilities():
    logits = torch.tensor([-50.0, 0.0, 50.0], requires_grad=True)
    beta_cdf(torch.sigmoid(logits), 0.6, 0.4).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1] > 0


def test_beta_cdf_rejects_bad_input():
    with pytest.raises(GatekitError, match="alpha"):
        beta_cdf(torch.tensor([0.5]), 0.0, 1.0)
    with pytest.raises(GatekitError, match=r"\[0, 1\]"):
        beta_cdf(torch.tensor([1.5]), 1.0, 1.0)


# --- Target-free sparsity loss (paper eq. 4-6) ----------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sparsity_loss_equals_the_formula(reduction):
    model = run_randomized()
    layer_rates, channel_rates = [], []
    for gate in gates_of(model).values():
        layer_rates.append(gate.layer_gates.mean().item())
        channel_rates += (gate.channel_gates * gate.layer_gates.unsqueeze(1)).mean(0).tolist()
    assert any(0 < rate < 1 for rate in layer_rates + channel_rates)  # else the check is vacuous
    reduce = sum if reduction == "sum" else (lambda values: sum(values) / len(values))
    expected = 0.3 * reduce([r * r for r in layer_rates]) + 0.7 * reduce([r * r for r in channel_rates])
    loss = sparsity_loss(model, layer=0.3, channel=0.7, reduction=reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert SparsityLoss(layer=0.3, channel=0.7, reduction=reduction)(model).item() == pytest.approx(expected, rel=1e-5)


def test_sparsity_loss_does_not_count_channels_of_skipped_blocks():
    model = gated_resnet8().eval()
    force_gates(model, 50.0)
    for gate in gates_of(model).values():
        nn.init.constant_(gate.layer_head.bias, -50.0)
    model(images())
    assert sparsity_loss(model, channel=1.0).item() == 0.0

    nn.init.constant_(gates_of(model)["layer2.0"].layer_head.bias, 50.0)
    model(images())
    # Only layer2.0 runs, all its 32 filters on for every sample: 32 rates of 1.
    assert sparsity_loss(model, channel=1.0).item() == 32.0


def test_sparsity_loss_raw_channels_count_skipped_blocks_and_leave_layer_gates_alone():
    model = run_randomized()
    expected = sum((gate.channel_gates.mean(0) ** 2).sum().item() for gate in gates_of(model).values())
    loss = sparsity_loss(model, channel=1.0, channel_rates="raw")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() > sparsity_loss(model, channel=1.0).item()  # some blocks were skipped
    last = list(gates_of(model).values())[-1]  # earlier layer gates reach later gates through the features
    raw_gradient, = torch.autograd.grad(loss, last.layer_head.weight, allow_unused=True)
    executed_gradient, = torch.autograd.grad(sparsity_loss(model, channel=1.0), last.layer_head.weight)
    assert raw_gradient is None or not raw_gradient.any()
    assert executed_gradient.any()


def test_sparsity_loss_rejects_an_unknown_reduction_or_channel_counting():
    model = run_randomized()
    with pytest.raises(GatekitError, match="reduction"):
        sparsity_loss(model, layer=1.0, reduction="max")
    with pytest.raises(GatekitError, match="channel_rates=.all."):
        sparsity_loss(model, channel=1.0, channel_rates="all")


# --- Target-rate loss (paper eq. 2) ---------------------------------------------------------------

def test_target_rate_loss_equals_the_formula_and_has_a_gradient():
    model = run_randomized()
    rates = [gate.layer_gates.mean().item() for gate in gates_of(model).values()]
    loss = target_rate_loss(model, target=0.4, weight=2.0)
    assert loss.item() == pytest.approx(2.0 * sum((r - 0.4) ** 2 for r in rates), rel=1e-6)
    loss.backward()
    assert all(gate.layer_head.weight.grad.abs().sum() > 0 for gate in gates_of(model).values())


def test_target_rate_loss_per_block_targets_by_sequence_and_mapping():
    model = run_randomized(gates="layer")
    names = [site.name for site in model.gatekit.sites]
    assert names == ["layer1.0", "layer2.0", "layer3.0"]
    targets = [1.0, 0.5, 0.25]
    rates = [gate.layer_gates.mean().item() for gate in gates_of(model).values()]
    expected = sum((r - t) ** 2 for r, t in zip(rates, targets))
    assert target_rate_loss(model, target=targets).item() == pytest.approx(expected, rel=1e-6)
    by_name = dict(zip(reversed(names), reversed(targets)))  # order of a mapping must not matter
    assert target_rate_loss(model, target=by_name).item() == pytest.approx(expected, rel=1e-6)
    assert TargetRateLoss(target=by_name)(model).item() == pytest.approx(expected, rel=1e-6)


def test_target_rate_loss_errors():
    model = run_randomized()
    with pytest.raises(GatekitError, match="expected 3"):
        target_rate_loss(model, target=[0.5, 0.5])
    with pytest.raises(GatekitError, match="layer1.0, layer2.0, layer3.0"):
        target_rate_loss(model, target={"layer1.0": 0.5, "layer2.0": 0.5, "layer9.0": 0.5})
    with pytest.raises(GatekitError, match="no target for blocks"):
        target_rate_loss(model, target={"layer1.0": 0.5})
    with pytest.raises(GatekitError, match=r"\[0, 1\]"):
        target_rate_loss(model, target=[0.5, 1.5, 0.5])
    with pytest.raises(GatekitError, match=r"\[0, 1\]"):
        TargetRateLoss(target=-0.1)
    with pytest.raises(GatekitError, match="gates='layer'"):
        target_rate_loss(run_randomized(gates="channel"), target=0.5)
    with pytest.raises(GatekitError, match="run the model"):
        target_rate_loss(gated_resnet8(), target=0.5)


# --- MAC budget ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gates", ["channel+layer", "layer", "channel"])
def test_expected_macs_of_open_and_closed_gates(gates):
    model = gated_resnet8(gates).eval()
    info = model.gatekit
    force_gates(model, 50.0)
    model(images())
    open_macs = expected_macs(model)
    assert open_macs.shape == (BATCH,)
    torch.testing.assert_close(open_macs, torch.full((BATCH,), float(info.dense_macs + gate_macs(model))))

    force_gates(model, -50.0)
    model(images())
    # A closed layer gate removes the whole branch; closed channel gates alone keep the rest of it.
    removed = sum(site.branch_macs if "layer" in gates else site.channel_macs for site in info.sites)
    closed = float(info.dense_macs - removed + gate_macs(model))
    torch.testing.assert_close(expected_macs(model), torch.full((BATCH,), closed))


def test_expected_macs_is_linear_in_the_layer_probability():
    model = gated_resnet8("layer").eval()
    force_gates(model, 0.0)  # every block runs with probability one half
    model(images())
    info = model.gatekit
    half = info.dense_macs - 0.5 * sum(site.branch_macs for site in info.sites) + gate_macs(model)
    torch.testing.assert_close(expected_macs(model), torch.full((BATCH,), float(half)))


def test_expected_macs_of_saturated_gates_equal_the_dynamic_macs():
    model = gated_resnet8().eval()
    with torch.no_grad():
        for head in heads(model):
            head.weight.zero_()
            head.bias.copy_(torch.randint(0, 2, head.bias.shape) * 100.0 - 50.0)
    model(images())
    torch.testing.assert_close(expected_macs(model), dynamic_macs(model).float())

    larger = measure_costs(model, model.gatekit.sites, torch.randn(1, 3, 64, 64))
    model(torch.randn(BATCH, 3, 64, 64))
    torch.testing.assert_close(expected_macs(model, larger), dynamic_macs(model, larger).float())
    # Every conv of a branch costs 4x at 2x the resolution, so the two checks differ.
    assert larger.branch_macs == tuple(4 * site.branch_macs for site in model.gatekit.sites)


def test_mac_budget_loss_reaches_every_gate_parameter():
    model = run_randomized()
    mac_budget_loss(model, budget=0.5).backward()
    for name, parameter in model.gatekit_gates.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_mac_budget_loss_moves_the_expected_cost_towards_the_budget():
    model = gated_resnet8().train()
    batch = images()
    optimizer = torch.optim.Adam(model.gatekit_gates.parameters(), lr=0.05)

    def fraction() -> float:
        return expected_macs(model).mean().item() / model.gatekit.dense_macs

    model(batch)
    start = fraction()
    assert start > 0.8  # fresh gates are on with probability sigmoid(3)
    for _ in range(15):
        optimizer.zero_grad()
        model(batch)
        loss = mac_budget_loss(model, budget=0.5, weight=10.0)
        loss.backward()
        optimizer.step()
    model(batch)
    assert abs(fraction() - 0.5) < 0.5 * abs(start - 0.5)
    assert MacBudgetLoss(budget=0.5, weight=10.0)(model).item() == pytest.approx(10.0 * (fraction() - 0.5) ** 2, rel=1e-4)


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2, float("nan")])
def test_mac_budget_rejects_a_budget_outside_the_unit_interval(budget):
    model = run_randomized()
    with pytest.raises(GatekitError, match=r"\(0, 1\]"):
        mac_budget_loss(model, budget=budget)
    with pytest.raises(GatekitError, match=r"\(0, 1\]"):
        MacBudgetLoss(budget=budget)


# --- Batch shaping ----------------------------------------------------------------------------------

def reference_batch_shaping(model, cdf, weight: float) -> float:
    """Per gate: sort the batch's probabilities and compare the prior's CDF to i / (B + 1)."""
    per_gate = []
    for gate in gates_of(model).values():
        columns = torch.sigmoid(gate.channel_logits).T.tolist() + [torch.sigmoid(gate.layer_logits).tolist()]
        for column in columns:
            ordered = sorted(column)
            count = len(ordered)
            per_gate.append(sum((cdf(x) - i / (count + 1)) ** 2 for i, x in enumerate(ordered, 1)) / count)
    return weight * sum(per_gate) / len(per_gate)


@pytest.mark.parametrize("alpha, beta, cdf", [
    (2.0, 1.0, lambda x: x * x),
    (0.5, 0.5, lambda x: 2 / math.pi * math.asin(math.sqrt(x))),
])
def test_batch_shaping_loss_matches_a_reference(alpha, beta, cdf):
    model = run_randomized()
    expected = reference_batch_shaping(model, cdf, weight=0.75)
    loss = batch_shaping_loss(model, weight=0.75, alpha=alpha, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert BatchShapingLoss(weight=0.75, alpha=alpha, beta=beta)(model).item() == pytest.approx(expected, rel=1e-5)


def test_batch_shaping_loss_has_gradients_and_decreases_under_optimisation():
    model = run_randomized()
    batch = images()
    batch_shaping_loss(model).backward()
    for name, parameter in model.gatekit_gates.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name

    optimizer = torch.optim.Adam(model.gatekit_gates.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        model(batch)
        loss = batch_shaping_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_batch_shaping_needs_a_batch():
    model = gated_resnet8().eval()
    model(images(1))
    with pytest.raises(GatekitError, match="at least two"):
        batch_shaping_loss(model)
    with pytest.raises(GatekitError, match="beta"):
        BatchShapingLoss(beta=0.0)


# --- Attached regularizers ---------------------------------------------------------------------------

def test_gate_loss_sums_the_attached_regularizers():
    terms = [SparsityLoss(layer=0.1, channel=0.2), MacBudgetLoss(budget=0.5), TargetRateLoss(target=0.7), BatchShapingLoss()]
    model = gated_resnet8(regularizer=terms).train()
    randomize_gates(model)
    model(images())
    expected = sum(term(model).item() for term in terms)
    assert gatekit.gate_loss(model).item() == pytest.approx(expected, rel=1e-6)

    single = gated_resnet8(regularizer=MacBudgetLoss(budget=0.3)).train()
    single(images())
    assert gatekit.gate_loss(single).item() == pytest.approx(mac_budget_loss(single, budget=0.3).item(), rel=1e-6)


def test_gate_loss_without_a_regularizer_says_how_to_attach_one():
    model = gated_resnet8()
    model(images())
    with pytest.raises(GatekitError, match="regularizer="):
        gatekit.gate_loss(model)
