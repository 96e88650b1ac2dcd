"""The experiment tooling of issue 5: training entry point, static pruning peer, data packing, sweep plan."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gatekit
from gatekit.adapters import get_model
from gatekit.datasets import load_dataset
from gatekit.errors import GatekitError
from gatekit.macs import static_macs

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "experiments")]

import oracle_gates  # noqa: E402
import oracle_skip  # noqa: E402
import pack_data  # noqa: E402
import paper_schedule  # noqa: E402
import report  # noqa: E402
import static_prune  # noqa: E402
import sweep  # noqa: E402
import train  # noqa: E402


def test_widths_build_a_thinner_block_and_refuse_bad_lists():
    model = get_model("cifar/resnet8", widths=[5, 7, 9])
    assert [b.conv1.out_channels for s in (model.layer1, model.layer2, model.layer3) for b in s] == [5, 7, 9]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(GatekitError, match="one positive int per block"):
        get_model("cifar/resnet8", widths=[5, 7])


def test_dense_models_save_and_load(tmp_path):
    model = get_model("mnist/resnet8", widths=[4, 8, 16]).eval()
    gatekit.save(model, tmp_path / "dense.pt")
    loaded = gatekit.load(tmp_path / "dense.pt")
    assert not hasattr(loaded, "gatekit")
    images = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_static_pruning_equals_the_dense_model_with_the_pruned_filters_zeroed():
    torch.manual_seed(0)
    dense = get_model("cifar/resnet8").eval()
    for module in dense.modules():  # non-trivial statistics, so a wrong channel would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    widths = static_prune.widths_for("cifar/resnet8", 0.5, {})
    static = static_prune.prune_to_widths(dense, "cifar/resnet8", widths, {}).eval()
    example = torch.zeros(1, 3, 32, 32)
    assert static_macs(static, example) <= 0.5 * static_macs(dense, example)

    kept = []  # which filters survived: the ones whose (random, distinct) bn1 means the pruned model kept
    blocks = list(static_prune._blocks(dense))
    for block, small in zip(blocks, static_prune._blocks(static)):
        means = block.bn1.running_mean
        kept.append([int((means == m).nonzero()[0]) for m in small.bn1.running_mean])
    assert all(len(set(k)) == len(k) < b.conv1.out_channels for k, b in zip(kept, blocks))
    hooks = [block.bn1.register_forward_hook(
        lambda module, args, output, keep=keep: output * torch.isin(torch.arange(output.shape[1]), torch.tensor(keep)).view(1, -1, 1, 1)
    ) for block, keep in zip(blocks, kept)]
    images = torch.randn(4, 3, 32, 32)
    masked = dense(images)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(static(images), masked, rtol=1e-4, atol=1e-4)


def test_train_refuses_arguments_that_cannot_mean_what_the_user_wants(capsys):
    for argv, message in (
        (["--method", "dlcg"], "needs a sparsity loss"),
        (["--method", "dense", "--layer", "0.1"], "has no gates"),
        (["--method", "channel", "--layer", "0.1"], "no layer gates"),
        (["--method", "static", "--static-fraction", "0.5"], "give --init"),
        (["--method", "dlcg", "--target", "0.5", "--budget", "0.5"], "not both"),
        (["--method", "dlcg", "--target", "0.5", "--channel-rates", "raw"], "give --channel too"),
    ):
        with pytest.raises(SystemExit):
            train.parse_args(["--out", "x", *argv])
        assert message in capsys.readouterr().err
    args = train.parse_args(["--out", "x", "--method", "dlcg", "--channel", "0.1", "--channel-rates", "raw"])
    assert train.regularizer(args).channel_rates == "raw"


def test_augment_crops_and_flips_each_image_by_its_own_draw():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    out = train.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for image, crop in zip(padded, out):  # every output is a window of its padded image, maybe flipped
        windows = image.unfold(1, 4, 1).unfold(2, 4, 1).reshape(1, -1, 4, 4)[0]
        assert any(torch.equal(crop[0], w) or torch.equal(crop[0], w.flip(1)) for w in windows)


@pytest.mark.parametrize("method", [["--method", "dlcg", "--layer", "0.01", "--channel", "0.01"],
                                    ["--method", "static", "--static-fraction", "0.5"]])
def test_train_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, method):
    dense = get_model("mnist/resnet8")
    gatekit.save(dense, tmp_path / "dense.pt")
    common = ["--dataset", "fashion-mnist", "--model", "mnist/resnet8", "--train-images", "256", "--batch-size", "64",
              "--init", str(tmp_path / "dense.pt"), "--no-val", "--device", "cpu", *method]
    train.main([*common, "--epochs", "2", "--out", str(tmp_path / "straight")])
    assert train.main([*common, "--epochs", "2", "--stop-after", "1", "--out", str(tmp_path / "half")]) == {
        "stopped_after_epoch": 1}
    assert not (tmp_path / "half" / "model.pt").exists()
    train.main([*common, "--epochs", "2", "--out", str(tmp_path / "half")])  # resumes at epoch 2
    straight = gatekit.load(tmp_path / "straight" / "model.pt").state_dict()
    resumed = gatekit.load(tmp_path / "half" / "model.pt").state_dict()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "half" / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]


def test_train_with_exits_fits_the_heads_then_finetunes_them_with_the_network(tmp_path):
    torch.manual_seed(0)
    dense = get_model("mnist/resnet8")
    gatekit.save(dense, tmp_path / "dense.pt")
    common = ["--dataset", "fashion-mnist", "--model", "mnist/resnet8", "--train-images", "256", "--batch-size", "64",
              "--init", str(tmp_path / "dense.pt"), "--no-val", "--device", "cpu", "--exits", "--exit-fit-images", "128"]
    train.main([*common, "--epochs", "1", "--out", str(tmp_path / "joint")])
    joint = gatekit.load(tmp_path / "joint" / "model.pt")
    assert [site.name for site in joint.gatekit_exits.sites] == ["layer1.0", "layer2.0"]
    assert torch.isinf(joint.gatekit_exit_policy.thresholds).all()  # saved uncalibrated: it never exits yet
    before = dense.state_dict()
    moved = [key for key, value in joint.state_dict().items() if key in before and not torch.equal(value, before[key])]
    assert "conv1.weight" in moved  # the backbone trained too, not only the heads
    summary = json.loads((tmp_path / "joint" / "summary.json").read_text())
    assert summary["config"]["kd"] == 0.7 and summary["config"]["exit_weight"] == 0.1
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", *common, "--compile"])


def test_pack_and_unpack_give_the_same_training_images(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_data, "_search_folders", lambda root: ([tmp_path / "src"], tmp_path / "src"))
    (tmp_path / "src").mkdir()
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 50).astype(np.uint8),
                  x_test=np.zeros((5, 28, 28), np.uint8), y_test=np.zeros(5, np.uint8))
    np.savez(tmp_path / "src" / "mnist.npz", **arrays)
    pack_data.pack("mnist", 2, tmp_path / "packed")
    with pytest.raises(SystemExit, match="1 of 2 parts"):
        only_first = tmp_path / "first"
        (only_first / "part0").mkdir(parents=True)
        for file in (tmp_path / "packed" / "part0").iterdir():
            (only_first / "part0" / file.name).write_bytes(file.read_bytes())
        pack_data.unpack(only_first, tmp_path / "partial")
    pack_data.unpack(tmp_path / "packed", tmp_path / "data")
    original = load_dataset("mnist", split="train", root=tmp_path / "src")
    unpacked = load_dataset("mnist", split="train", root=tmp_path / "data")
    for a, b in zip(original.tensors, unpacked.tensors):
        assert torch.equal(a, b)
    with pytest.raises(GatekitError):  # the held-out images did not travel: no silent zeros as test data
        load_dataset("mnist", split="test", root=tmp_path / "data")


def test_sweep_plan_gives_every_method_the_same_budget():
    runs = sweep.plan("cifar10", dense_epochs=4, finetune_epochs=2)
    names = [r.name for r in runs]
    assert {n.split("-")[0] for n in names} == {"pretrain", "dense", "dlcg", "dlcgraw", "channel", "aig", "budget", "static"}
    for run in runs:
        epochs = int(run.arguments[run.arguments.index("--epochs") + 1])
        assert epochs == (4 if run.name.startswith("pretrain") else 2)
        assert run.after is None or run.after in names
    assert sum(n.startswith("dlcg-") for n in names) == len(sweep.GRIDS["full"]["sparsity"]) >= 4
    assert sum("--channel-rates" in r.arguments for r in runs) == len(sweep.GRIDS["full"]["sparsity"])
    names = [r.name for r in sweep.plan("cifar10", 4, 1, extra_channel=(0.03, 0.06))]
    assert {"channel-c0.03", "channel-c0.06", "dlcgraw-l0.06-c0.06"} <= set(names)
    assert sum(n.startswith("dlcgraw") for n in names) == 4 and "dlcgraw-l0.001-c0.001" not in names


def test_report_compares_methods_at_equal_macs_without_extrapolating(tmp_path):
    assert report.accuracy_at([(0.2, 0.5), (0.6, 0.9)], 0.5) == pytest.approx(0.8)
    assert report.accuracy_at([(0.6, 0.9), (0.2, 0.5)], 0.2) == pytest.approx(0.5)  # any order
    assert report.accuracy_at([(0.2, 0.5), (0.6, 0.9)], 0.7) is None
    assert report.accuracy_at([(0.5, 0.9)], 0.5) == 0.9
    assert report.accuracy_at([(0.5, 0.9)], 0.4) is None

    def row(run: str, macs: float, accuracy: float) -> dict:
        return dict(run=run, method=report.method_of(run), test=dict(mean_macs=macs, accuracy=accuracy))

    # Static and smaller dense models count against the dense ResNet20's MACs, not their own.
    rows = [row("dense-resnet20", 100.0, 0.92), row("dense-resnet14", 65.0, 0.91),
            row("aig-t0.8", 90.0, 0.90), row("aig-t0.2", 20.0, 0.60), row("static-f0.5", 50.0, 0.88)]
    report.write_equal_macs(rows, "test", tmp_path / "equal.md")
    table = (tmp_path / "equal.md").read_text()
    assert "| 50 | 72.86 | 88.00 |" in table  # 60 + (90 - 60) * (50 - 20) / (90 - 20)
    assert "| 40 | 68.57 | – |" in table
    assert "dense-resnet14 91.00 % at 65.0 %" in table


def test_report_takes_the_exit_run_best_on_val_at_each_budget():
    assert report.method_of("exits-static-f0.5-b0.4") == "exits-static"
    assert report.method_of("exits-dense-resnet20-b0.65") == "exits-dense"

    def row(run: str, budget: float, val: float, macs: float, test: float) -> dict:
        return dict(run=run, method=report.method_of(run), config=dict(budgets=[budget]), val=dict(accuracy=val),
                    test=dict(mean_macs=macs, accuracy=test))

    rows = [row("exits-static-f0.65-b0.4", 0.4, 0.90, 41.0, 0.80), row("exits-static-f0.5-b0.4", 0.4, 0.91, 39.0, 0.70),
            row("exits-static-f0.5-b0.3", 0.3, 0.88, 30.0, 0.60)]
    # At 40 %, static-f0.5's exits win on val, so they stand for the method, whatever test says.
    assert sorted(report.points(rows, "exits-static", "test", 100.0)) == [(0.3, 0.6), (0.39, 0.7)]


def test_report_measures_only_the_splits_a_run_lacks(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "static-f0.5"
    run.mkdir()
    gatekit.save(get_model("mnist/resnet8", widths=[4, 8, 16]).eval(), run / "model.pt")
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    first = report.evaluate_run(run, {"val": data})
    cached = json.loads((run / "eval.json").read_text())
    cached["val"]["accuracy"] = -1.0  # a marker: a re-measured val would overwrite it
    (run / "eval.json").write_text(json.dumps(cached))
    second = report.evaluate_run(run, {"val": data, "val-jpeg": data})
    assert second["val"]["accuracy"] == -1.0
    assert second["val-jpeg"]["accuracy"] == first["val"]["accuracy"]  # same images, measured now
    assert json.loads((run / "eval.json").read_text())["val-jpeg"] == second["val-jpeg"]


def test_the_skipping_oracle_keeps_every_prediction_and_only_lowers_the_cost():
    torch.manual_seed(0)
    dense = get_model("cifar/resnet8").eval()
    images = torch.randn(16, 3, 32, 32)
    model = oracle_skip.layer_gated(dense, images[:1]).eval()
    full_predictions, full_macs = oracle_skip.run(model, images, torch.ones(len(images), 3))
    assert torch.equal(full_predictions, dense(images).argmax(1))
    keep = oracle_skip.greedy_skip(model, images)
    predictions, macs = oracle_skip.run(model, images, keep)
    assert torch.equal(predictions, full_predictions)
    assert (macs <= full_macs).all() and (macs < full_macs).any()
    assert torch.equal(macs < full_macs, (keep == 0).any(1))  # a skipped block is a cheaper image
    assert not any(gate._forward_hooks for gate in gatekit.gates_of(model).values())  # hooks removed
    summary = oracle_skip.oracle(model, images)
    assert summary["oracle_mean_macs"] == pytest.approx(float(macs.double().mean()))


def test_gates_trained_on_the_oracle_fit_its_mask_and_leave_the_network_alone():
    torch.manual_seed(0)
    model = oracle_skip.layer_gated(get_model("cifar/resnet8").eval(), torch.zeros(1, 3, 32, 32)).eval()
    images = torch.randn(32, 3, 32, 32)
    keep = torch.tensor([[1.0, 0.0, 1.0]]).repeat(32, 1)  # a mask the gates can learn: block 2 always off
    network = {k: v.clone() for k, v in model.state_dict().items() if "gatekit_gates" not in k}
    with torch.no_grad():
        before = torch.nn.functional.binary_cross_entropy_with_logits(
            oracle_gates.teacher_forced_logits(model, images, keep), keep)
    oracle_gates.train_gates(model, images, keep, epochs=5, batch_size=16)
    with torch.no_grad():
        after = torch.nn.functional.binary_cross_entropy_with_logits(
            oracle_gates.teacher_forced_logits(model, images, keep), keep)
    assert after < before / 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in network.items())
    with torch.no_grad():
        model(images)
    assert torch.equal(gatekit.gates_of(model)["layer2.0"].layer_gates, torch.zeros(32))


def test_the_paper_schedule_runs_table_1_and_its_peers_from_scratch(tmp_path, monkeypatch):
    runs = dict(paper_schedule.plan(400))
    table_1 = [(float(a[a.index("--layer") + 1]), float(a[a.index("--channel") + 1])) for a in runs.values() if "--layer" in a]
    assert table_1 == list(paper_schedule.TABLE_1) and len(table_1) == 9
    assert all("--init" not in arguments and arguments[arguments.index("--epochs") + 1] == "400" for arguments in runs.values())
    assert {"dense-resnet20", "dense-resnet14", "dense-resnet8"} <= set(runs)
    # One epoch on a few batches, two runs side by side, as on the GPU but on the CPU.
    try:
        load_dataset("cifar10", split="val", limit=1)
    except GatekitError as error:
        pytest.skip(f"needs the CIFAR-10 data: {error}")
    monkeypatch.setattr(sys, "argv", ["paper_schedule.py", "--out", str(tmp_path), "--epochs", "1", "--only",
                                      "dense-resnet8", "dlcg-l0.05-c0.1", "--", "--train-images", "256", "--no-val",
                                      "--device", "cpu", "--threads", "1"])
    with pytest.raises(SystemExit) as exit_status:
        paper_schedule.main()
    assert exit_status.value.code == 0
    for name in ("dense-resnet8", "dlcg-l0.05-c0.1"):
        assert gatekit.load(tmp_path / "cifar10" / name / "model.pt") is not None
