"""Gate statistics records, their accumulation over batches, and the JSON-lines and TensorBoard writers."""
import json

import pytest
import torch
from torch import nn

import gatekit
from gatekit.logging import GateMeter, JsonLinesWriter, TensorBoardWriter, gate_record
from toy_models import ToyResNet

X = torch.randn(16, 3, 16, 16)


def gated_toy():
    gated = gatekit.convert(ToyResNet(), example_input=X[:1]).eval()
    first, second = gatekit.gates_of(gated).values()
    nn.init.constant_(first.layer_head.bias, -50.0)  # block 0 never runs
    second.channel_head.bias.data = torch.tensor([50.0] * 6 + [-50.0] * 2)  # 6 of 8 filters run
    return gated


def test_record_of_one_batch_agrees_with_gate_stats_and_dynamic_macs():
    gated = gated_toy()
    gated(X)
    record = gate_record(gated)
    assert record["execution_rate"] == 0.5 and record["channel_rate"] == 0.375  # as gatekit.summarize
    assert record["blocks.0/execution_rate"] == 0.0 and record["blocks.1/channel_rate"] == 0.75
    dense = gated.gatekit.dense_macs
    assert record["dense_macs"] == dense
    assert record["mean_macs"] == gatekit.dynamic_macs(gated).double().mean().item()
    assert record["mac_fraction"] == pytest.approx(record["mean_macs"] / dense)
    assert set(gate_record(gated, per_block=False)) == {"execution_rate", "channel_rate", "mean_macs", "dense_macs",
                                                         "mac_fraction"}


def test_meter_weights_batches_by_their_sizes():
    gated = gated_toy()
    second = gatekit.gates_of(gated)["blocks.1"]
    meter = GateMeter(gated)
    gated(X[:12])
    meter.update()
    nn.init.constant_(second.layer_head.bias, -50.0)  # now block 1 is skipped too
    gated(X[:4])
    meter.update()
    record = meter.compute()
    assert meter.samples == 16
    assert record["blocks.1/execution_rate"] == 12 / 16  # not the mean of the batch rates, 1/2
    assert record["blocks.1/channel_rate"] == pytest.approx(0.75 * 12 / 16)
    meter.reset()
    with pytest.raises(gatekit.GatekitError, match="call update"):
        meter.compute()
    with pytest.raises(gatekit.GatekitError, match="no decisions yet"):
        GateMeter(gatekit.convert(ToyResNet(), example_input=X[:1])).update()


def test_json_lines_writer_appends_one_parseable_line_per_call(tmp_path):
    gated = gated_toy()
    gated(X)
    path = tmp_path / "logs" / "gates.jsonl"
    log = JsonLinesWriter(path)
    log.write(gate_record(gated), epoch=0)
    log.write(gate_record(gated, per_block=False), epoch=1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert lines[0]["blocks.1/channel_rate"] == 0.75 and "blocks.1/channel_rate" not in lines[1]
    assert lines[1]["execution_rate"] == 0.5 and lines[1]["time"] > 0


def test_tensorboard_writer_adds_every_value_as_a_scalar(tmp_path):
    gated = gated_toy()
    gated(X)

    class Recorder:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    recorder = Recorder()
    TensorBoardWriter(writer=recorder).write(gate_record(gated, per_block=False), step=7)
    assert ("gatekit/execution_rate", 0.5, 7) in recorder.scalars and len(recorder.scalars) == 5


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gated = gated_toy()
    gated(X)
    board = TensorBoardWriter(tmp_path)
    board.write(gate_record(gated), step=3)
    board.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "gatekit/blocks.1/channel_rate" in events.Tags()["scalars"]
    (event,) = events.Scalars("gatekit/channel_rate")
    assert event.step == 3 and event.value == pytest.approx(0.375)


def test_profile_progress_bar_counts_samples_and_ends_full_when_stopped_early(capsys):
    gatekit.profile(gated_toy(), X, batch_size=4, max_samples=10, progress=True)
    assert "10/10" in capsys.readouterr().err  # 3 batches of 4, the last cut to 2
    gatekit.profile(gated_toy(), X, batch_size=4)
    assert capsys.readouterr().err == ""  # quiet by default
