"""The finetuning recipe's pieces: noise annealing, sparsity ramp, distillation, BN recalibration,
warm start and the budget controller (docs/howto/finetune.md)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gatekit
from gatekit import GatekitError, gates_of
from gatekit.adapters import get_model
from gatekit.relaxation import gumbel_sigmoid, threshold

from test_losses import force_gates, gated_resnet8, images, randomize_gates


# --- Noise -----------------------------------------------------------------------------------------

def test_without_noise_training_decisions_are_the_eval_thresholds_and_still_get_gradients():
    logits = torch.tensor([[-2.0, -0.1, 0.1, 3.0]], requires_grad=True)
    gates = gumbel_sigmoid(logits, 0.5, noise=0.0)
    assert torch.equal(gates.detach(), threshold(logits.detach()))
    gates.sum().backward()
    expected = torch.sigmoid(logits.detach() / 0.5) * (1 - torch.sigmoid(logits.detach() / 0.5)) / 0.5
    assert torch.allclose(logits.grad, expected)


def test_noise_scale_sets_how_often_a_decision_flips():
    logits = torch.full((200_000,), 1.0)
    torch.manual_seed(0)
    full = gumbel_sigmoid(logits, noise=1.0).mean().item()
    half = gumbel_sigmoid(logits, noise=0.5).mean().item()
    assert full == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.005)
    assert half == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=0.005)


def test_noise_schedule_waits_then_reaches_its_end_linearly():
    model = gated_resnet8()
    schedule = gatekit.NoiseSchedule(model, steps=4, delay=2)
    values = [schedule.noise] + [schedule.step() for _ in range(8)]
    assert values == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert {gate.noise for gate in gates_of(model).values()} == {0.0}
    model.train()
    model(images())
    eval_copy = copy.deepcopy(model).eval()
    eval_copy(images())  # same weights, same inputs: decisions must agree with training's now
    torch.manual_seed(1)
    batch = images()
    model(batch), eval_copy(batch)
    for name, gate in gates_of(model).items():
        assert torch.equal(gate.channel_gates.detach(), gates_of(eval_copy)[name].channel_gates)


@pytest.mark.parametrize("noise", [-0.1, float("nan"), "1"])
def test_set_noise_refuses_what_is_not_a_scale(noise):
    with pytest.raises(GatekitError, match="noise"):
        gatekit.set_noise(gated_resnet8(), noise)


# --- Sparsity schedule -----------------------------------------------------------------------------

def test_sparsity_schedule_ramps_every_attached_loss_from_nothing_to_its_setting():
    sparsity = gatekit.SparsityLoss(layer=0.1, channel=0.2)
    budget = gatekit.MacBudgetLoss(budget=0.4, controller=0)
    target = gatekit.TargetRateLoss(target=0.6)
    shaping = gatekit.BatchShapingLoss()
    model = gated_resnet8(regularizer=[sparsity, budget, target, shaping]).train()
    randomize_gates(model)
    schedule = gatekit.SparsitySchedule(model, steps=4)
    model(images())
    assert sparsity(model).item() == 0.0 and budget.target == 1.0
    closed = {name: 1.0 for name in gates_of(model)}
    assert target(model).item() == pytest.approx(gatekit.target_rate_loss(model, target=closed).item())
    schedule.step(), schedule.step()
    assert budget.target == pytest.approx(0.7)
    assert sparsity(model).item() == pytest.approx(gatekit.sparsity_loss(model, layer=0.05, channel=0.1).item())
    for _ in range(5):
        schedule.step()
    assert schedule.pressure == 1.0 and budget.target == pytest.approx(0.4)
    assert target(model).item() == pytest.approx(gatekit.target_rate_loss(model, target=0.6).item())
    assert not hasattr(shaping, "pressure")


@pytest.mark.parametrize("make, read", [
    (lambda m: gatekit.TemperatureSchedule(m, start=5.0, end=0.5, steps=20), lambda m: gates_of(m)["layer1.0"].temperature),
    (lambda m: gatekit.NoiseSchedule(m, steps=20, delay=3), lambda m: gates_of(m)["layer1.0"].noise),
    (lambda m: gatekit.SparsitySchedule(m, steps=20), lambda m: m.gatekit.regularizer.pressure),
])
def test_a_schedule_resumes_from_its_state_dict_where_it_was(make, read):
    original = gated_resnet8(regularizer=gatekit.SparsityLoss(layer=0.1))
    schedule = make(original)
    for _ in range(7):
        schedule.step()
    resumed_model = gated_resnet8(regularizer=gatekit.SparsityLoss(layer=0.1))
    resumed = make(resumed_model)
    assert read(resumed_model) != read(original)
    resumed.load_state_dict(schedule.state_dict())
    assert read(resumed_model) == read(original)  # applied on loading, before the next step
    assert resumed.step() == schedule.step()


def test_sparsity_schedule_needs_a_loss_it_can_ramp():
    with pytest.raises(GatekitError, match="pressure"):
        gatekit.SparsitySchedule(gated_resnet8(regularizer=gatekit.BatchShapingLoss()), steps=10)
    with pytest.raises(GatekitError, match="steps"):
        gatekit.SparsitySchedule(gated_resnet8(regularizer=gatekit.SparsityLoss(layer=0.1)), steps=-1)


# --- Distillation ----------------------------------------------------------------------------------

def test_distillation_matches_the_hand_computed_soft_target_term():
    teacher = get_model("cifar/resnet8").eval()
    batch = images()
    student_logits = torch.randn(len(batch), 10)
    loss = gatekit.DistillationLoss(teacher, temperature=3.0, weight=0.5)(student_logits, batch)
    with torch.no_grad():
        p_teacher = torch.softmax(teacher(batch) / 3.0, dim=1)
    log_student = torch.log_softmax(student_logits / 3.0, dim=1)
    expected = 0.5 * 9.0 * (p_teacher * (p_teacher.log() - log_student)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_teacher_gets_no_gradient_and_stays_out_of_the_gated_model(tmp_path):
    teacher = get_model("cifar/resnet8").eval()
    before = copy.deepcopy(teacher.state_dict())
    gated = gatekit.convert(teacher, example_input=torch.randn(1, 3, 32, 32)).train()
    distill = gatekit.DistillationLoss(teacher)
    batch = images()
    distill(gated(batch), batch).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in gated.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    grouped = sum(len(group["params"]) for group in gatekit.param_groups(gated))
    assert grouped == len(list(gated.parameters()))
    assert all(p is not q for p in gated.parameters() for q in teacher.parameters())
    gatekit.save(gated.eval(), tmp_path / "model.pt")
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]) == set(gated.state_dict())


def test_distillation_refuses_a_training_teacher_one_on_another_device_and_bad_settings():
    teacher = get_model("cifar/resnet8")
    with pytest.raises(GatekitError, match=r"teacher.eval\(\)"):
        gatekit.DistillationLoss(teacher)(torch.randn(8, 10), images())
    assert teacher.training  # the user's model is not switched behind their back
    meta_teacher = get_model("cifar/resnet8").eval().to("meta")
    with pytest.raises(GatekitError, match="meta"):
        gatekit.DistillationLoss(meta_teacher)(torch.randn(8, 10), images())
    with pytest.raises(GatekitError, match="temperature"):
        gatekit.DistillationLoss(teacher.eval(), temperature=0)
    with pytest.raises(GatekitError, match="shape"):
        gatekit.DistillationLoss(teacher.eval())(torch.randn(8, 7), images())


def _block_inputs(model: nn.Module, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Each named block's input, read by pre-hooks on the plain model's own block modules."""
    seen, modules = {}, dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0]))
               for name in names]
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    return seen


def test_feature_distillation_matches_block_inputs_read_from_the_plain_models():
    teacher = get_model("cifar/resnet8").eval()
    student = gatekit.convert(teacher, example_input=torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        student.get_submodule("layer1.0.conv1").weight.mul_(1.5)  # a student that has drifted
    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        perturbed.layer1[0].conv1.weight.mul_(1.5)
    student.train()
    for module in student.modules():  # batch statistics as the teacher's, and no noise: gates open
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    gatekit.set_noise(student, 0.0)
    distill = gatekit.DistillationLoss(teacher, weight=0.5, features=2.0, student=student)
    batch = images()
    logits = student(batch)
    loss = distill(logits, batch)
    names = list(gatekit.gates_of(student))
    ours, theirs = _block_inputs(perturbed, batch, names), _block_inputs(teacher, batch, names)
    features = torch.stack([(ours[n] - theirs[n]).pow(2).sum() / theirs[n].pow(2).sum() for n in names]).mean()
    assert features > 0.01  # the drift reaches every later block
    logit_term = gatekit.DistillationLoss(teacher, weight=0.5)(logits, batch)
    assert loss.item() == pytest.approx(logit_term.item() + 2.0 * features.item(), rel=1e-4)
    loss.backward()
    assert student.get_submodule("layer1.0.conv1").weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(module._forward_pre_hooks for module in teacher.modules())  # hooks go on a converted copy
    with pytest.raises(GatekitError, match="no student features"):
        distill(logits, batch)  # the same features twice: a forward was skipped
    student.eval()(batch)
    with pytest.raises(GatekitError, match="no student features"):
        distill(logits, batch)  # an eval forward (an EMA copy's, say) records nothing
    distill.remove()
    assert not any(gate._forward_pre_hooks for gate in gatekit.gates_of(student).values())


def test_feature_distillation_pairs_a_top_k_student_with_its_teacher():
    teacher = get_model("cifar/resnet8").eval()
    student = gatekit.convert(teacher, example_input=torch.randn(1, 3, 32, 32), channel_keep=0.5).train()
    distill = gatekit.DistillationLoss(teacher, features=1.0, student=student)
    batch = images()
    assert torch.isfinite(distill(student(batch), batch))


def test_feature_distillation_refuses_a_missing_or_plain_student():
    teacher = get_model("cifar/resnet8").eval()
    with pytest.raises(GatekitError, match="student="):
        gatekit.DistillationLoss(teacher, features=1.0)
    with pytest.raises(GatekitError, match="gatekit.convert"):
        gatekit.DistillationLoss(teacher, features=1.0, student=get_model("cifar/resnet8"))
    with pytest.raises(GatekitError, match="features"):
        gatekit.DistillationLoss(teacher, features=-1.0)
    student = gatekit.convert(teacher, example_input=torch.randn(1, 3, 32, 32), exclude=["layer3.*"])
    with pytest.raises(GatekitError, match="differ"):
        gatekit.DistillationLoss(gatekit.convert(teacher, example_input=torch.randn(1, 3, 32, 32)),
                                 features=1.0, student=student)


# --- Batch-norm recalibration ----------------------------------------------------------------------

def test_recalibration_computes_the_cumulative_statistics_and_restores_modes_and_momenta():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU()).train()
    model[0].eval()  # a mixed set of flags must come back as it was
    batches = [torch.randn(5, 3, 8, 8) + i for i in range(3)]
    samples = gatekit.recalibrate_batchnorm(model, batches)
    assert samples == 15
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in features])
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, variances.mean(0), atol=1e-4)
    assert model[1].momentum == 0.3 and model.training and model[1].training and not model[0].training


def test_recalibration_uses_eval_decisions_of_the_gates():
    model = gated_resnet8().train()
    force_gates(model, -0.5)  # eval: every gate closed; training noise would open about 40 %
    gatekit.recalibrate_batchnorm(model, images(16))
    assert model.training and all(g.training for g in gates_of(model).values())
    # Closed blocks pass nothing to their batch norms: their statistics stay at the reset values.
    norm = model.get_submodule("layer1.0.bn2")
    assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))


def test_recalibration_refuses_no_data_and_no_batch_norm_and_keeps_the_statistics():
    model = gated_resnet8()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(GatekitError, match="no sample"):
        gatekit.recalibrate_batchnorm(model, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(GatekitError, match="no batch norm"):
        gatekit.recalibrate_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3)), images())
    with pytest.raises(GatekitError, match="max_batches"):
        gatekit.recalibrate_batchnorm(model, images(), max_batches=0)


# --- Warm start ------------------------------------------------------------------------------------

def test_warm_start_keeps_the_filters_of_largest_group_norm_and_lands_under_the_budget():
    model = gated_resnet8(regularizer=gatekit.MacBudgetLoss(budget=0.5)).eval()
    fraction = gatekit.warm_start(model, 0.5)
    report = gatekit.profile(model, images(4))
    assert fraction <= 0.5 and report.mean_macs / report.dense_macs == pytest.approx(fraction)
    assert fraction > 0.45  # 1/256 steps of the keep fraction: close to the budget
    for site in model.gatekit.sites:
        block = model.get_submodule(site.name)  # first conv, its batch norm, the consumer's input slices
        norms = (block.conv1.weight.abs().flatten(1).sum(1) + block.bn1.weight.abs()
                 + block.conv2.weight.abs().transpose(0, 1).flatten(1).sum(1)) / 3
        kept = gates_of(model)[site.name].channel_gates[0].bool()
        assert norms[kept].min() >= norms[~kept].max()
    static = gated_resnet8().eval()  # the same model with the dropped filters zeroed by hand
    static.load_state_dict(model.state_dict())
    with torch.no_grad():
        for site in model.gatekit.sites:
            kept = gates_of(model)[site.name].channel_gates[0].bool()
            static.get_submodule(site.first_conv).weight[~kept] = 0
            norm = static.get_submodule(site.first_conv.replace("conv1", "bn1"))
            norm.weight[~kept], norm.bias[~kept] = 0, 0
    batch = images()
    assert torch.allclose(model(batch), static(batch), atol=1e-5)


def test_warm_start_refuses_what_it_cannot_start():
    with pytest.raises(GatekitError, match=r"\(0, 1\]"):
        gatekit.warm_start(gated_resnet8(), 1.5)
    with pytest.raises(GatekitError, match="gates='layer'"):
        gatekit.warm_start(gated_resnet8("layer"), 0.5)
    with pytest.raises(GatekitError, match="below what the channel gates can reach"):
        gatekit.warm_start(gated_resnet8(), 0.01)
    with pytest.raises(GatekitError, match="one tensor for each"):
        gatekit.warm_start(gated_resnet8(), 0.5, scores={"layer1.0": torch.ones(16)})


# --- Budget controller -----------------------------------------------------------------------------

def test_controller_raises_the_multiplier_on_overshoot_once_per_forward():
    loss = gatekit.MacBudgetLoss(budget=0.5)
    model = gated_resnet8(regularizer=loss).train()  # every gate open: deployed cost ~1.0
    model(images())
    first = gatekit.gate_loss(model)
    assert first.item() == pytest.approx(gatekit.mac_budget_loss(model, budget=0.5).item(), rel=1e-6)
    excess = gatekit.deployed_macs(model).mean().item() / model.gatekit.dense_macs - 0.5
    assert excess > 0.4 and loss.multiplier == pytest.approx(loss.controller * excess)
    raised = loss.multiplier
    gatekit.gate_loss(model)  # same forward: no second update
    assert loss.multiplier == raised
    model(images())
    assert gatekit.gate_loss(model).item() > first.item()  # the multiplier now adds raised * fraction
    model.eval()
    model(images())
    gatekit.gate_loss(model)
    assert loss.multiplier == pytest.approx(2 * raised, rel=1e-5)  # eval forwards never update it


def test_deployed_macs_count_the_thresholded_decisions_not_the_sampled_ones():
    model = gated_resnet8().train()
    randomize_gates(model)
    model(images())
    deployed = gatekit.deployed_macs(model)
    assert not deployed.requires_grad
    sampled = gatekit.dynamic_macs(model)
    for gate in gates_of(model).values():
        gate.channel_gates, gate.layer_gates = threshold(gate.channel_logits), threshold(gate.layer_logits)
    thresholded = gatekit.dynamic_macs(model)
    assert not torch.equal(sampled, thresholded)  # the noise changed some decisions
    assert torch.allclose(deployed, thresholded.to(deployed.dtype), rtol=1e-6)


def test_default_warm_start_keeps_the_filters_torch_pruning_keeps():
    torch_pruning = pytest.importorskip("torch_pruning")
    dense = get_model("cifar/resnet8").eval()
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.normal_()  # a spread of norms, as in a trained model
    model = gatekit.convert(dense, example_input=torch.randn(1, 3, 32, 32))
    gatekit.warm_start(model, 0.5)
    graph = torch_pruning.DependencyGraph().build_dependency(dense, example_inputs=torch.randn(1, 3, 32, 32))
    importance = torch_pruning.importance.MagnitudeImportance(p=1)
    for site in model.gatekit.sites:
        conv = dense.get_submodule(site.first_conv)
        group = graph.get_pruning_group(conv, torch_pruning.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        kept = gates_of(model)[site.name].channel_head.bias > 0
        reference = importance(group).argsort(descending=True)[: int(kept.sum())]
        assert set(reference.tolist()) == set(kept.nonzero().flatten().tolist()), site.name
