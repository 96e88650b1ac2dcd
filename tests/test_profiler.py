import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gatekit
from gatekit.adapters import get_model
from gatekit.dynamic_macs import dynamic_macs
from test_macs import randomize_gates


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    model = gatekit.convert(get_model("cifar/resnet8"), example_input=torch.randn(1, 3, 32, 32))
    randomize_gates(model)
    return model.eval()


def labelled(count=40, size=32):
    images = torch.randn(count, 3, size, size) + 2 * torch.randn(count, 3, 1, 1)
    return TensorDataset(images, torch.randint(0, 10, (count,)))


def test_profile_totals_agree_with_dynamic_macs_and_accuracy(gated):
    data = labelled()
    report = gatekit.profile(gated, data, batch_size=16)
    images, labels = data.tensors
    outputs = gated(images)
    assert list(report.per_sample_macs) == dynamic_macs(gated).tolist()
    assert report.accuracy == (outputs.argmax(1) == labels).sum().item() / 40
    assert report.dense_macs == gated.gatekit.dense_macs
    assert report.mean_macs == pytest.approx(sum(report.per_sample_macs) / 40)
    assert report.gate_overhead == sum(g.macs for g in gatekit.gates_of(gated).values()) / report.dense_macs
    stats = gatekit.gate_stats(gated)
    for block in report.blocks:
        assert block.execution_rate == pytest.approx(stats[block.name].execution_rate)
        assert block.channel_rate == pytest.approx(stats[block.name].channel_rate)
    # The blocks' mean MACs plus what always runs add up to the mean per-sample MACs.
    always = report.dense_macs - sum(site.branch_macs for site in gated.gatekit.sites)
    assert always + sum(b.mean_macs for b in report.blocks) == pytest.approx(report.mean_macs)


def test_profile_reads_tensors_loaders_and_respects_max_samples(gated):
    data = labelled()
    from_loader = gatekit.profile(gated, DataLoader(data, batch_size=7))
    assert from_loader.per_sample_macs == gatekit.profile(gated, data).per_sample_macs
    unlabelled = gatekit.profile(gated, data.tensors[0], max_samples=10, batch_size=4)
    assert len(unlabelled.per_sample_macs) == 10 and unlabelled.accuracy is None


def test_profile_measures_macs_at_the_data_input_size(gated):
    report = gatekit.profile(gated, torch.randn(4, 3, 64, 64))
    # Every conv of a fully convolutional net costs four times as much at twice the side; fc does not.
    assert report.dense_macs == 4 * (gated.gatekit.dense_macs - 640) + 640


def test_dense_models_cost_their_dense_macs():
    report = gatekit.profile(get_model("cifar/resnet8"), torch.randn(5, 3, 32, 32))
    assert set(report.per_sample_macs) == {report.dense_macs} and report.saving == 0 and report.blocks == ()


def test_reports_json_table_and_plot(gated, tmp_path):
    report = gatekit.profile(gated, labelled())
    report.to_json(tmp_path / "profile.json")
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["dense_macs"] == report.dense_macs and saved["mean_macs"] == report.mean_macs
    assert [b["name"] for b in saved["blocks"]] == ["layer1.0", "layer2.0", "layer3.0"]
    assert saved["percentiles"]["p1"] <= saved["percentiles"]["p50"] <= saved["percentiles"]["p99"]
    table = report.table()
    assert "layer2.0" in table and f"{report.dense_macs:,}" in table and "accuracy" in table
    report.plot(tmp_path / "profile.png")
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_errors_name_the_problem(gated):
    with pytest.raises(gatekit.GatekitError, match="no sample"):
        gatekit.profile(gated, torch.randn(0, 3, 32, 32))
    with pytest.raises(gatekit.GatekitError, match=r"cannot take inputs of shape \(1, 32, 32\)"):
        gatekit.profile(gated, torch.randn(2, 1, 32, 32))
    with pytest.raises(gatekit.GatekitError, match="batch of type"):
        gatekit.profile(gated, [{"image": torch.randn(1, 3, 32, 32)}])


def test_profile_restores_training_mode(gated):
    gated.train()
    gatekit.profile(gated, torch.randn(2, 3, 32, 32))
    assert gated.training and all(m.training for m in gated.modules())
    gated.eval()
