"""gatekit.compact: static decisions folded into the architecture, the rest still gated and exact."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit.adapters import get_model
from test_macs import randomize_gates
from test_sparse import randomize_norms

SHAPE = (3, 16, 16)


def forced(gate, *, layer=None, never=(), always=()):
    """Make some of a gate's decisions constant: the layer gate (True/False), and filters that never
    or always open; the other decisions stay input-dependent."""
    if layer is not None:
        gate.layer_head.weight.data.zero_()
        gate.layer_head.bias.data.fill_(50.0 if layer else -50.0)
    for rows, bias in ((list(never), -50.0), (list(always), 50.0)):
        gate.channel_head.weight.data[rows] = 0.0
        gate.channel_head.bias.data[rows] = bias


@pytest.fixture(scope="module")
def gated():
    """A ResNet20 whose blocks cover every fold: layer1.0 always runs and never opens 5 filters,
    layer1.1 never runs, layer1.2 runs every filter always (ungated), the rest are input-dependent."""
    torch.manual_seed(0)
    model = gatekit.convert(randomize_norms(get_model("cifar/resnet20").eval()), example_input=torch.zeros(1, *SHAPE))
    randomize_gates(model)
    gates = gatekit.gates_of(model)
    forced(gates["layer1.0"], layer=True, never=range(5))
    forced(gates["layer1.1"], layer=False)
    forced(gates["layer1.2"], layer=True, always=range(16))
    return model.eval()


def images(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *SHAPE, generator=generator) + 2 * torch.randn(count, SHAPE[0], 1, 1, generator=generator)


def test_folds_what_the_calibration_set_decides_the_same_way(gated):
    calibration = images(32, seed=1)
    compacted = gatekit.compact(gated, calibration, batch_size=8)
    report = compacted.gatekit_compaction
    folds = {block.name: block for block in report.blocks}
    assert folds["layer1.0"].filters_kept <= 11 and not folds["layer1.0"].layer_gate and folds["layer1.0"].channel_gate
    assert folds["layer1.1"].removed
    assert (folds["layer1.2"].channel_gate, folds["layer1.2"].layer_gate, folds["layer1.2"].filters_kept) == (False, False, 16)
    assert report.calibration_samples == 32 and report.differing_samples == 0
    assert compacted.get_submodule("layer1.0.conv1").out_channels == folds["layer1.0"].filters_kept
    assert compacted.get_submodule("layer1.0.conv2").in_channels == folds["layer1.0"].filters_kept
    assert not {"layer1.1.conv1", "layer1.1.conv2"} & dict(compacted.named_modules()).keys()  # the branch is gone
    assert [site.name for site in compacted.gatekit.sites][:1] == ["layer1.0"]  # layer1.1 and layer1.2: no gate left
    with torch.no_grad():
        torch.testing.assert_close(compacted(calibration), gated(calibration), atol=1e-4, rtol=1e-4)
    assert report.max_output_difference <= 1e-4
    assert report.dense_macs_after < report.dense_macs_before == gated.gatekit.dense_macs


def test_sparse_after_compact_equals_masked_and_costs_the_counted_macs(gated):
    calibration = images(8, seed=2)
    compacted = gatekit.compact(gated, calibration)
    fast = gatekit.sparse(compacted)
    gate_macs = lambda model: sum(gate.macs for gate in gatekit.gates_of(model).values())  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(fast(calibration), compacted(calibration), atol=1e-4, rtol=1e-4)
        for image in calibration.split(1):
            gated(image)
            compacted(image)
            counted = gatekit.dynamic_macs(compacted).item()
            # Same branches run; only the gates folded away cost nothing any more.
            assert counted == gatekit.dynamic_macs(gated).item() - (gate_macs(gated) - gate_macs(compacted))
            with FlopCounterMode(display=False) as counter:
                fast(image)
            assert counter.get_total_flops() // 2 == counted
    report = gatekit.profile(compacted, calibration)
    assert report.dense_macs == compacted.gatekit.dense_macs


def test_saves_and_loads_as_compacted(gated, tmp_path):
    calibration = images(16, seed=3)
    compacted = gatekit.compact(gated, calibration)
    gatekit.save(compacted, tmp_path / "compacted.pt")
    loaded = gatekit.load(tmp_path / "compacted.pt")
    assert loaded.gatekit.sites == compacted.gatekit.sites
    assert loaded.gatekit.compaction == compacted.gatekit.compaction
    with torch.no_grad():
        torch.testing.assert_close(loaded(calibration), compacted(calibration), atol=0, rtol=0)
    again = gatekit.compact(loaded, calibration)  # compacting twice: both plans are kept, in order
    gatekit.save(again, tmp_path / "twice.pt")
    with torch.no_grad():
        torch.testing.assert_close(gatekit.load(tmp_path / "twice.pt")(calibration), gated(calibration), atol=1e-4, rtol=1e-4)


def test_unseen_inputs_that_decide_as_folded_give_the_same_output(gated):
    compacted = gatekit.compact(gated, images(4, seed=4))
    report = compacted.gatekit_compaction
    held_out = images(24, seed=5)
    differing = [report.differing(gated, image) for image in held_out.split(1)]
    assert report.differing(gated, held_out) == sum(differing) > 0  # 4 inputs do not show every pattern
    with torch.no_grad():
        for image, differs in zip(held_out.split(1), differing):
            if not differs:
                torch.testing.assert_close(compacted(image), gated(image), atol=1e-4, rtol=1e-4)


def test_the_input_model_is_not_modified(gated):
    state = copy.deepcopy(gated.state_dict())
    code, modes = gated.code, {name: m.training for name, m in gated.named_modules()}
    gated.train()
    gatekit.compact(gated, images(8, seed=6))
    assert all(m.training for m in gated.modules())
    gated.eval()
    assert gated.code == code and {name: m.training for name, m in gated.named_modules()} == modes
    assert state.keys() == gated.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in gated.state_dict().items())


def test_bad_input_raises_gatekit_errors(gated):
    with pytest.raises(gatekit.NotConvertedError):
        gatekit.compact(get_model("cifar/resnet8"), images(2, seed=7))
    with pytest.raises(gatekit.GatekitError, match="sparse"):
        gatekit.compact(gatekit.sparse(gated), images(2, seed=7))
    with pytest.raises(gatekit.GatekitError, match="no sample"):
        gatekit.compact(gated, torch.zeros(0, *SHAPE))
    with pytest.raises(gatekit.GatekitError, match="cannot take"):
        gatekit.compact(gated, torch.zeros(2, 5, 16, 16))
    with pytest.raises(gatekit.GatekitError, match="cannot read"):
        gatekit.compact(gated, [{"image": torch.zeros(1, *SHAPE)}])
    compacted = gatekit.compact(gated, images(2, seed=7))
    with pytest.raises(gatekit.GatekitError, match="made from"):
        compacted.gatekit_compaction.differing(gatekit.convert(get_model("cifar/resnet8")), images(2, seed=7))
