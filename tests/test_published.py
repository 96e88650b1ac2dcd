"""The published checkpoints (results/<dataset>/runs/): they load, ``gatekit profile`` reproduces the
reported figures, and sparse execution is exact on finetuned gates, not only on random ones.

Needs the Fashion-MNIST and CIFAR-10 test splits (``../shared/data`` or ``$GATEKIT_DATA``); skipped
without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit import cli
from gatekit.datasets import load_dataset
from gatekit.errors import GatekitError
from gatekit.macs import measure_costs

RESULTS = Path(__file__).resolve().parents[1] / "results"
# (results folder, dataset, run). cifar10-short: the earlier 4 + 1-epoch sweep, kept for its varied gates.
GATED = [("fashion-mnist", "fashion-mnist", run) for run in ("dlcg-l0.0025-c0.0025", "channel-c0.006", "aig-t0.4", "budget-b0.4")] + [
    ("cifar10-short", "cifar10", "dlcgraw-l0.015-c0.015"),  # filters closed inside blocks that run
    ("cifar10", "cifar10", "dlcg-b0.5"),  # issue 13's recipe: blocks skipped for some images
]


def load_test_split(dataset: str):
    try:
        return load_dataset(dataset, split="test")
    except GatekitError as error:
        pytest.skip(f"needs the {dataset} data (set GATEKIT_DATA to the folder holding it): {error}")


def reported(folder: str, run: str) -> dict:
    rows = json.loads((RESULTS / folder / "runs.json").read_text())
    return next(row for row in rows if row["run"] == run)


@pytest.mark.parametrize("folder, dataset, run", GATED)
def test_sparse_execution_is_exact_on_finetuned_gates(folder, dataset, run):
    gated = gatekit.load(RESULTS / folder / "runs" / run / "model.pt")
    images = load_test_split(dataset).tensors[0][:64]
    # The Fashion-MNIST checkpoints were converted at 224 x 224 (the default then): count at the data's size.
    costs = measure_costs(gated, gated.gatekit.sites, images[:1])
    with torch.inference_mode():
        masked = gated(images)
        fast = gatekit.sparse(gated)
        torch.testing.assert_close(fast(images), masked, rtol=1e-4, atol=1e-4)
        for image in images[:4].split(1):  # the sparse model performs exactly the MACs the profiler reports
            gated(image)
            with FlopCounterMode(display=False) as counter:
                fast(image)
            assert counter.get_total_flops() // 2 == gatekit.dynamic_macs(gated, costs).item()


@pytest.mark.parametrize("folder, dataset", [("fashion-mnist", "fashion-mnist"), ("cifar10-short", "cifar10")])
def test_profile_reproduces_the_reported_accuracy_and_macs(folder, dataset):
    run = "dlcg-l0.0025-c0.0025"
    report = gatekit.profile(gatekit.load(RESULTS / folder / "runs" / run / "model.pt"), load_test_split(dataset),
                             batch_size=500)
    expected = reported(folder, run)["test"]
    assert report.accuracy == pytest.approx(expected["accuracy"], abs=1e-9)
    # The figures were made with torch's operators in the gates; the C gate kernel rounds differently,
    # and 1 of Fashion-MNIST's 3.45 million decisions, whose logit is 2.4e-7, flips (docs/sparse.md).
    assert report.mean_macs == pytest.approx(expected["mean_macs"], rel=1e-4)


@pytest.mark.parametrize("run", ["dlcg-b0.65", "static-f0.65"])
def test_the_cifar10_sweep_checkpoints_reproduce_their_reported_test_figures(run, tmp_path):
    """results/cifar10 (issue 13's sweep): `gatekit profile` on a gated and a static checkpoint gives
    the accuracy and mean MACs experiments/report.py published for the 1,000 lossless test images."""
    load_test_split("cifar10")
    checkpoint = RESULTS / "cifar10" / "runs" / run / "model.pt"
    status = cli.main(["profile", str(checkpoint), "--dataset", "cifar10", "--split", "test", "--batch-size", "500",
                       "--json", str(tmp_path / "profile.json"), "--quiet"])
    assert status == 0
    measured, expected = json.loads((tmp_path / "profile.json").read_text()), reported("cifar10", run)["test"]
    assert measured["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert measured["mean_macs"] == pytest.approx(expected["mean_macs"], rel=1e-9)


def test_the_cifar10_base_reproduces_its_val_accuracy(tmp_path):
    """results/cifar10-base (issue 22): `gatekit profile` on the published ResNet20 gives the val
    accuracy examples/train.py wrote in its summary."""
    load_test_split("cifar10")
    run = RESULTS / "cifar10-base" / "resnet20"
    status = cli.main(["profile", str(run / "model.pt"), "--dataset", "cifar10", "--split", "val",
                       "--batch-size", "500", "--json", str(tmp_path / "profile.json"), "--quiet"])
    assert status == 0
    measured = json.loads((tmp_path / "profile.json").read_text())
    expected = json.loads((run / "summary.json").read_text())
    assert measured["samples"] == 5000 and measured["accuracy"] == pytest.approx(expected["val_accuracy"], abs=1e-9)
    assert measured["accuracy"] >= 0.91  # the target for the base
    assert measured["mean_macs"] == measured["dense_macs"] == 40_551_040  # dense: every image pays every MAC


def profile_published_exit_run(run: str, tmp_path) -> tuple[dict, dict, dict[int, list[int]]]:
    """`gatekit profile` on a published exit run of results/cifar10-base/comparison on the lossless test
    images: what it measured, what experiments/report.py published, and each exit's per-image MACs."""
    load_test_split("cifar10")
    folder = RESULTS / "cifar10-base" / "comparison" / "cifar10"
    status = cli.main(["profile", str(folder / "runs" / run / "model.pt"), "--dataset", "cifar10", "--split", "test",
                       "--batch-size", "500", "--json", str(tmp_path / "profile.json"), "--quiet"])
    assert status == 0
    measured = json.loads((tmp_path / "profile.json").read_text())
    expected = next(row for row in json.loads((folder / "runs.json").read_text()) if row["run"] == run)["test"]
    cost = {}
    for index, macs in zip(measured["per_sample_exits"], measured["per_sample_macs"]):
        cost.setdefault(index, []).append(macs)
    return measured, expected, cost


def test_a_published_exit_checkpoint_counts_its_exits(tmp_path):
    """results/cifar10-base/comparison (issues 21 and 22): `gatekit profile` on static pruning plus
    exits reproduces the published test figures, and every image's MACs are those of the exit it took."""
    measured, expected, cost = profile_published_exit_run("exits-static-f0.65-b0.5", tmp_path)
    assert measured["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert measured["mean_macs"] == pytest.approx(expected["mean_macs"], rel=1e-9)
    exits = measured["exits"]
    assert [e["name"] for e in exits][-1] == "final" and sum(e["rate"] for e in exits) == pytest.approx(1.0)
    assert 0 < exits[-1]["rate"] < 1  # some images left early, some ran to the end
    assert all(len(set(values)) == 1 for values in cost.values())  # a static backbone: one cost per exit
    assert sorted(cost) == sorted(cost, key=lambda index: cost[index][0])  # later exits cost more


def test_published_exits_on_a_gated_backbone_reproduce_their_figures(tmp_path):
    """results/cifar10-base/comparison: exits on DLCG (the JPEG headline of docs/results.md) reproduce
    the published test figures; the gates still choose per image, so one exit has several costs."""
    measured, expected, cost = profile_published_exit_run("exits-dlcg-b0.65-b0.5", tmp_path)
    assert measured["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert measured["mean_macs"] == pytest.approx(expected["mean_macs"], rel=1e-4)  # gates: see the first test
    assert any(len(set(values)) > 1 for values in cost.values())
    means = [sum(cost[index]) / len(cost[index]) for index in sorted(cost)]
    assert means == sorted(means)  # a later exit costs more on average
