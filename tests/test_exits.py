"""Exit heads: placement, function preservation, MAC counting, fitting, calibration, errors."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit.adapters import get_model
from gatekit.exit_macs import exit_costs_per_sample, measure_exit_costs

X = torch.randn(6, 3, 32, 32)


@pytest.fixture
def resnet8():
    torch.manual_seed(0)
    return get_model("cifar/resnet8", num_classes=10).eval()


def _labelled(model, count=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return torch.utils.data.TensorDataset(images, labels)


def test_sites_are_found_from_the_graph(resnet8):
    sites = gatekit.exit_sites(resnet8)
    assert [site.name for site in sites] == ["layer1.0", "layer2.0"]
    assert [site.next_block for site in sites] == ["layer2.0", "layer3.0"]
    assert [site.channels for site in sites] == [16, 32]
    assert [site.stage_end for site in sites] == [True, True]
    resnet20 = get_model("cifar/resnet20")
    assert [s.name for s in gatekit.add_exits(resnet20, at="stages").gatekit_exits.sites] == ["layer1.2", "layer2.2"]
    assert len(gatekit.add_exits(resnet20).gatekit_exits.sites) == 8


def test_fresh_exits_preserve_the_function(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    assert torch.equal(exits(X), resnet8(X))
    assert exits.gatekit_exit_policy.taken.tolist() == [2] * len(X)  # everyone reaches the final head
    exits.train()
    torch.manual_seed(1)
    out = exits(X)
    assert out.shape == (6, 10) and len(exits.gatekit_exit_policy.exit_logits) == 2
    assert all(module.training for module in exits.modules())
    assert not resnet8.training  # the model passed in is not modified


def test_exits_on_a_gated_model_keep_its_function_and_gates():
    torch.manual_seed(0)
    model = get_model("cifar/resnet8").eval()
    gated = gatekit.convert(model).eval()
    exits = gatekit.add_exits(gated).eval()
    assert torch.equal(exits(X), model(X))
    assert exits.gatekit.sites == gated.gatekit.sites
    # Every sample at the final head: the exit count is the gated count plus every head.
    heads = sum(measure_exit_costs(exits).head_macs)
    assert torch.equal(gatekit.exit_macs(exits), gatekit.dynamic_macs(exits) + heads)


def test_a_sample_that_leaves_pays_up_to_its_exit(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    exits.gatekit_exit_policy.thresholds.fill_(0.0)  # every sample leaves at the first exit
    exits(X[:1])
    # stem 16*3*9*32*32 = 442,368; layer1.0 two 16->16 3x3 convs at 32x32: 2 * 16*16*9*1024 =
    # 4,718,592; head after layer1.0: 16 channels * 4*4 pooled * 10 classes = 2,560.
    assert gatekit.exit_macs(exits).tolist() == [442_368 + 4_718_592 + 2_560]
    every = exit_costs_per_sample(exits)
    dense = gatekit.macs.static_macs(resnet8, X[:1])
    assert every[0, -1].item() == dense + 2_560 + 32 * 16 * 10
    assert every[0].tolist() == sorted(every[0].tolist())


def test_exit_macs_equal_flop_counter_on_the_network_up_to_the_exit(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    exits.gatekit_exit_policy.thresholds.fill_(0.0)
    exits(X[:1])
    counted = gatekit.exit_macs(exits).item()

    def truncated(x):  # what a sample leaving at the first exit runs
        out = resnet8.layer1(resnet8.relu(resnet8.bn1(resnet8.conv1(x))))
        return exits.gatekit_exit_heads.layer1_0(out)

    with FlopCounterMode(display=False) as counter:
        truncated(X[:1])
    assert counted == counter.get_total_flops() // 2


def test_fitting_the_heads_leaves_the_backbone_bit_identical(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    before = {k: v.clone() for k, v in exits.state_dict().items()}
    fit = gatekit.fit_exits(exits, _labelled(resnet8), epochs=3, batch_size=16)
    after = exits.state_dict()
    heads = [k for k in after if k.startswith("gatekit_exit_heads.")]
    others = [k for k in after if k not in heads]
    assert others and all(torch.equal(before[k], after[k]) for k in others)
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    assert fit.samples == 64 and set(fit.train_accuracy) == {"layer1.0", "layer2.0"}
    assert not exits.training and not any(m.training for m in exits.modules())


def test_fitted_heads_learn_the_labels(resnet8):
    exits = gatekit.add_exits(resnet8, at=["layer2.0"]).eval()
    data = _labelled(resnet8, count=128)
    fit = gatekit.fit_exits(exits, data, epochs=40, batch_size=32, lr=0.01, distill=0.0)
    assert fit.train_accuracy["layer2.0"] > 0.9  # 128 samples, 512 features: a linear head fits them


def test_a_calibrated_budget_lands_on_the_calibration_data(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    data = _labelled(resnet8, count=96)
    gatekit.fit_exits(exits, data, epochs=5, batch_size=32)
    dense = exits.gatekit_exits.dense_macs
    for budget in (0.9, 0.7, 0.5):
        calibration = gatekit.calibrate_exits(exits, data, budget=budget)
        report = gatekit.profile(exits, data)
        assert report.mean_macs == pytest.approx(calibration.mean_macs)
        assert report.mean_macs <= budget * dense
        assert calibration.thresholds == (calibration.thresholds[0],) * 2
        assert sum(calibration.exit_rates) == pytest.approx(1.0)
    calibration = gatekit.calibrate_exits(exits, data, agreement=1.0)
    assert calibration.agreement == 1.0
    reference = gatekit.calibrate_exits(exits, data, budget=0.9, reference_macs=2 * dense)
    assert reference.mean_macs <= 1.8 * dense


def test_per_exit_thresholds_land_the_budget_and_never_lose_to_the_shared_one():
    torch.manual_seed(0)
    model = get_model("cifar/resnet14").eval()  # four exits: room for thresholds to differ
    exits = gatekit.add_exits(model).eval()
    data = _labelled(model, count=128)
    gatekit.fit_exits(exits, data, epochs=3, batch_size=32)
    data = _labelled(model, count=128, seed=1)  # calibration data the heads were not fitted on
    dense, moved = exits.gatekit_exits.dense_macs, []
    for budget in (0.8, 0.6):
        shared = gatekit.calibrate_exits(exits, data, budget=budget)
        per_exit = gatekit.calibrate_exits(exits, data, budget=budget, per_exit=True)
        moved.append(per_exit.thresholds != shared.thresholds)
        assert per_exit.mean_macs <= budget * dense
        assert per_exit.accuracy >= shared.accuracy
        report = gatekit.profile(exits, data)  # the thresholds set on the model are those reported
        assert report.accuracy == pytest.approx(per_exit.accuracy) and report.mean_macs == pytest.approx(per_exit.mean_macs)
        assert torch.equal(exits.gatekit_exit_policy.thresholds, torch.tensor(per_exit.thresholds))
    assert any(moved)  # the search did move thresholds apart
    lowest = gatekit.calibrate_exits(exits, data, agreement=0.9, per_exit=True)
    assert lowest.agreement >= 0.9 and lowest.mean_macs <= gatekit.calibrate_exits(exits, data, agreement=0.9).mean_macs


def test_temperatures_are_fitted_per_head(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    data = _labelled(resnet8, count=64)
    gatekit.fit_exits(exits, data, epochs=3, batch_size=32)
    calibration = gatekit.calibrate_exits(exits, data, budget=0.8, fit_temperatures=True)
    assert len(calibration.temperatures) == 2 and calibration.temperatures != (1.0, 1.0)
    assert torch.equal(exits.gatekit_exit_policy.temperatures, torch.tensor(calibration.temperatures))


def test_profile_reports_each_exit(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    data = _labelled(resnet8, count=40)
    exits.gatekit_exit_policy.thresholds.copy_(torch.tensor([2.0, 0.0]))  # the first never, the second always
    report = gatekit.profile(exits, data, batch_size=16)
    assert [e.name for e in report.exits] == ["layer1.0", "layer2.0", "final"]
    assert [e.rate for e in report.exits] == [0.0, 1.0, 0.0]
    assert report.per_sample_exits == (1,) * 40
    assert "exit" in report.table() and report.to_dict()["exits"][1]["rate"] == 1.0
    assert report.gate_macs == 2_560 + 5_120


def test_exit_loss_trains_the_heads(resnet8):
    exits = gatekit.add_exits(resnet8).train()
    labels = torch.randint(0, 10, (6,))
    logits = exits(X)
    loss = torch.nn.functional.cross_entropy(logits, labels) + gatekit.exit_loss(exits, labels)
    loss.backward()
    assert all(p.grad is not None for p in exits.gatekit_exit_heads.parameters())
    hard = gatekit.exit_loss(exits, labels, distill=0.0)
    soft = gatekit.exit_loss(exits, None, distill=1.0, teacher=logits.detach())
    assert hard.item() > 0 and soft.item() >= 0


def test_a_gated_sample_that_left_costs_nothing_after_its_exit():
    torch.manual_seed(0)
    gated = gatekit.convert(get_model("cifar/resnet8")).eval()
    exits = gatekit.add_exits(gated, at=["layer1.0"]).eval()
    exits.gatekit_exit_policy.thresholds.fill_(0.0)
    report = gatekit.profile(exits, X)
    blocks = {block.name: block for block in report.blocks}
    assert blocks["layer1.0"].execution_rate == 1.0
    assert blocks["layer2.0"].execution_rate == 0.0 and blocks["layer2.0"].mean_macs == 0.0
    assert set(report.per_sample_macs) == {442_368 + 4_718_592 + gated.gatekit_gates.layer1_0.macs + 2_560}


# Bad input: each gets a GatekitError that names the fix, and the model passed in is unchanged.

def test_a_model_with_no_site_for_an_exit():
    from toy_models import PlainCNN, ToyResNet

    x = torch.randn(1, 3, 16, 16)
    for model in (ToyResNet(blocks=1), PlainCNN()):
        with pytest.raises(gatekit.ExitsError, match="no place for an exit"):
            gatekit.add_exits(model, example_input=x)
    home_made = ToyResNet(blocks=2).eval()
    exits = gatekit.add_exits(home_made, example_input=x).eval()
    assert [site.name for site in exits.gatekit_exits.sites] == ["blocks.0"]
    assert torch.equal(exits(x), home_made(x))


def test_a_model_that_does_not_return_logits():
    from toy_models import InlineResidual

    with pytest.raises(gatekit.ExitsError, match="one logits tensor"):
        gatekit.add_exits(InlineResidual(), example_input=torch.randn(1, 3, 16, 16))


def test_exits_added_twice(resnet8):
    with pytest.raises(gatekit.ExitsError, match="already has exit heads"):
        gatekit.add_exits(gatekit.add_exits(resnet8))


@pytest.mark.parametrize("options, message", [
    (dict(at="everywhere"), "'blocks', 'stages'"), (dict(at=["layer9.9"]), "no exit site"),
    (dict(at=[]), "non-empty"), (dict(pool=0), "pool"), (dict(hidden=-1), "hidden"), (dict(rule="vote"), "rule"),
])
def test_bad_options(resnet8, options, message):
    with pytest.raises(gatekit.ExitsError, match=message):
        gatekit.add_exits(resnet8, **options)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan")])
def test_a_budget_outside_the_unit_interval(resnet8, budget):
    exits = gatekit.add_exits(resnet8).eval()
    with pytest.raises(gatekit.GatekitError, match=r"\(0, 1\]"):
        gatekit.calibrate_exits(exits, X, budget=budget)


@pytest.mark.parametrize("training, targets, message", [
    (False, dict(budget=0.05), "first exit costs"),
    (True, dict(budget=0.5), "model.eval()"),
    (False, dict(budget=0.5, agreement=0.99), "one target"),
])
def test_calibration_refuses(resnet8, training, targets, message):
    exits = gatekit.add_exits(resnet8).train(training)
    with pytest.raises(gatekit.GatekitError, match=message):
        gatekit.calibrate_exits(exits, X, **targets)


def test_empty_calibration_data(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    with pytest.raises(gatekit.GatekitError, match="no sample"):
        gatekit.calibrate_exits(exits, torch.empty(0, 3, 32, 32), budget=0.5)
    with pytest.raises(gatekit.GatekitError, match="no sample"):
        gatekit.fit_exits(exits, torch.empty(0, 3, 32, 32), distill=1.0)


def test_a_teacher_on_another_device(resnet8):
    exits = gatekit.add_exits(resnet8).train()
    exits(X)
    with pytest.raises(gatekit.GatekitError, match="device"):
        gatekit.exit_loss(exits, torch.zeros(6, dtype=torch.long), teacher=torch.zeros(6, 10, device="meta"))
    teacher = get_model("cifar/resnet8").to("meta")
    with pytest.raises(gatekit.GatekitError, match="teacher is on meta"):
        gatekit.fit_exits(exits, _labelled(resnet8), teacher=teacher)


def test_exit_loss_without_an_exit_forward(resnet8):
    exits = gatekit.add_exits(resnet8)
    with pytest.raises(gatekit.ExitsError, match="run the model on a batch"):
        gatekit.exit_loss(exits, torch.zeros(2, dtype=torch.long))
    with pytest.raises(gatekit.ExitsError, match="add_exits"):
        gatekit.exit_loss(resnet8, torch.zeros(2, dtype=torch.long))


def test_labels_needed_without_full_distillation(resnet8):
    exits = gatekit.add_exits(resnet8).eval()
    with pytest.raises(gatekit.GatekitError, match="labels"):
        gatekit.fit_exits(exits, X, distill=0.5)


def test_save_and_load_keep_exits_and_thresholds(resnet8, tmp_path):
    exits = gatekit.add_exits(resnet8, at=["layer2.0"], pool=2, rule="margin").eval()
    gatekit.fit_exits(exits, _labelled(resnet8, count=32), epochs=2, batch_size=16)
    exits.gatekit_exit_policy.thresholds.fill_(0.3)
    gatekit.save(exits, tmp_path / "exits.pt")
    loaded = gatekit.load(tmp_path / "exits.pt")
    assert torch.equal(loaded(X), exits(X))
    assert torch.equal(loaded.gatekit_exit_policy.taken, exits.gatekit_exit_policy.taken)
    assert loaded.gatekit_exits.options == exits.gatekit_exits.options
    assert loaded.gatekit_exit_policy.rule == "margin"


def test_save_and_load_a_gated_model_with_exits(tmp_path):
    torch.manual_seed(0)
    gated = gatekit.convert(get_model("cifar/resnet8"), gates="channel").eval()
    exits = gatekit.add_exits(gated).eval()
    exits.gatekit_exit_policy.thresholds.fill_(0.2)
    gatekit.save(exits, tmp_path / "gated.pt")
    loaded = gatekit.load(tmp_path / "gated.pt")
    assert torch.equal(loaded(X), exits(X))
    assert torch.equal(gatekit.exit_macs(loaded), gatekit.exit_macs(exits))


def _mixed(model):
    """``model`` with random heads and a threshold that sends part of X out at each exit."""
    exits = gatekit.add_exits(model).eval()
    torch.manual_seed(3)
    for head in exits.gatekit_exit_heads.values():
        torch.nn.init.normal_(head.classifier[0].weight, std=0.5)
    exits(X)
    confidences = exits.gatekit_exit_policy.confidences(exits.gatekit_exit_policy.exit_logits)
    exits.gatekit_exit_policy.thresholds.copy_(torch.stack([confidences[:, 0].quantile(0.6), confidences[:, 1].quantile(0.5)]))
    exits(X)
    assert len(set(exits.gatekit_exit_policy.taken.tolist())) > 1  # the batch really mixes exits
    return exits


def test_exit_macs_count_the_last_forward_of_a_mixed_batch(resnet8):
    exits = _mixed(resnet8)
    exits(X)
    taken = exits.gatekit_exit_policy.taken.clone()
    counted = gatekit.exit_macs(exits)
    assert torch.equal(exits.gatekit_exit_policy.taken, taken)  # counting does not run the model again
    every = exit_costs_per_sample(exits)
    assert torch.equal(counted, every[torch.arange(len(X)), taken])
    assert counted.tolist() == list(gatekit.profile(exits, X).per_sample_macs)


def test_sparse_exits_stop_and_equal_the_masked_model(resnet8):
    exits = _mixed(resnet8)
    fast = gatekit.sparse(exits)
    torch.testing.assert_close(fast(X), exits(X), rtol=1e-5, atol=1e-5)  # smaller batches: other kernels
    assert torch.equal(fast.taken, exits.gatekit_exit_policy.taken)
    for i in range(len(X)):
        torch.testing.assert_close(fast(X[i:i + 1]), exits(X[i:i + 1]), rtol=1e-5, atol=1e-5)
        with FlopCounterMode(display=False) as counter:
            fast(X[i:i + 1])
        assert counter.get_total_flops() // 2 == gatekit.profile(exits, X[i:i + 1]).per_sample_macs[0]


def test_sparse_exits_on_a_gated_model():
    from test_macs import randomize_gates

    torch.manual_seed(0)
    gated = gatekit.convert(get_model("cifar/resnet8"))
    randomize_gates(gated)
    exits = _mixed(gated.eval())
    fast = gatekit.sparse(exits)
    torch.testing.assert_close(fast(X), exits(X), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.taken, exits.gatekit_exit_policy.taken)
    for i in range(3):
        torch.testing.assert_close(fast(X[i:i + 1]), exits(X[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_torch_compile_of_a_model_with_exits_matches_eager(resnet8):
    exits = _mixed(resnet8)
    expected, taken = exits(X), exits.gatekit_exit_policy.taken
    compiled = torch.compile(exits, backend="aot_eager")
    torch.testing.assert_close(compiled(X), expected)
    assert torch.equal(exits.gatekit_exit_policy.taken, taken)  # the records the profiler reads are kept


def test_onnx_export_of_a_model_with_exits_computes_the_masked_form(resnet8, tmp_path):
    import collections

    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from gatekit.export import to_onnx

    exits = _mixed(resnet8)
    expected = exits(X)
    path = to_onnx(exits, tmp_path / "exits.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": X.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-5)
    operators = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert operators["If"] == 0 and operators["Loop"] == 0  # masked: samples that left still run everything
    assert operators["Conv"] == 7 and operators["Gemm"] == 3  # the whole ResNet8, two heads and the classifier
    with pytest.raises(gatekit.GatekitError, match="dynamo=True"):
        to_onnx(exits, tmp_path / "ts.onnx", dynamo=False)


def test_cli_lists_exit_sites_with_what_leaving_costs(capsys):
    from gatekit.cli import main

    assert main(["sites", "cifar/resnet8", "--exits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("after block") and "40,551,040" not in lines[0]
    # Leaving after layer1.0 pays the stem (3*16*9*32*32 = 442,368), the block (2*16*16*9*32*32 =
    # 4,718,592) and its head (16 channels pooled to 4x4, to 10 classes: 2,560).
    assert lines[1].split()[:5] == ["layer1.0", "16", "yes", "2,560", "5,163,520"]
    assert [line.split()[0] for line in lines[1:]] == ["layer1.0", "layer2.0"]
