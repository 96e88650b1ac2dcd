import pickle

import pytest
import torch

import gatekit
from gatekit.adapters import get_model
from test_macs import randomize_gates

X = torch.randn(4, 3, 32, 32) + torch.randn(4, 3, 1, 1)


@pytest.fixture
def gated():
    model = gatekit.convert(
        get_model("cifar/resnet8", shortcut="B", num_classes=7), gates="channel", exclude=["layer1.*"],
        example_input=X[:1], temperature=0.5,
    )
    randomize_gates(model)
    return model.eval()


def test_round_trip_rebuilds_the_same_gated_model(gated, tmp_path):
    gatekit.save(gated, tmp_path / "model.pt")
    loaded = gatekit.load(tmp_path / "model.pt")
    torch.testing.assert_close(loaded(X), gated(X), rtol=0, atol=0)
    assert [s.name for s in loaded.gatekit.sites] == ["layer2.0", "layer3.0"]
    assert loaded.gatekit.mode == "channel" and not loaded.training
    assert all(g.temperature == 0.5 for g in gatekit.gates_of(loaded).values())


def test_round_trip_in_a_fresh_process(gated, tmp_path):
    import subprocess
    import sys

    gatekit.save(gated, tmp_path / "model.pt")
    torch.save(X, tmp_path / "x.pt")
    script = (
        "import sys, torch, gatekit; m = gatekit.load(sys.argv[1]); "
        "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), gated(X))


def test_a_plain_state_dict_loads_into_a_converted_model(gated):
    fresh = gatekit.convert(get_model("cifar/resnet8", shortcut="B", num_classes=7), gates="channel",
                            exclude=["layer1.*"], example_input=X[:1]).eval()
    fresh.load_state_dict(gated.state_dict())
    assert torch.equal(fresh(X), gated(X))


def test_models_not_built_by_name_cannot_be_saved(tmp_path):
    from toy_models import ToyResNet

    gated = gatekit.convert(ToyResNet(), example_input=torch.randn(1, 3, 16, 16))
    with pytest.raises(gatekit.GatekitError, match="get_model"):
        gatekit.save(gated, tmp_path / "toy.pt")


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-made malicious pickle
@pytest.mark.parametrize("content, match", [
    (None, "no checkpoint"),
    (b"", "not a readable"),
    ("truncated", "not a readable"),
    (pickle.dumps(Exploit()), "not a readable"),
    ({"weights": torch.zeros(1)}, "not a gatekit checkpoint"),
    ("future", "format 99"),
])
def test_bad_files_give_clear_errors_and_run_no_code(gated, tmp_path, capsys, content, match):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        gatekit.save(gated, path)
        path.write_bytes(path.read_bytes()[:500])
    elif content == "future":
        gatekit.save(gated, path)
        checkpoint = torch.load(path, weights_only=True)
        torch.save({**checkpoint, "format_version": 99}, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(gatekit.GatekitError, match=match):
        gatekit.load(path)
    assert "pwned" not in capsys.readouterr().out


def _saved(gated, path, **edits):
    """Save ``gated``, then rewrite the file with ``edits`` applied to the checkpoint dict (None deletes)."""
    gatekit.save(gated, path)
    checkpoint = torch.load(path, weights_only=True)
    for key, value in edits.items():
        if value is None:
            del checkpoint[key]
        else:
            checkpoint[key] = value(checkpoint[key]) if callable(value) else value
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_of_another_gatekit_version_in_the_same_format_loads(gated, tmp_path):
    path = _saved(gated, tmp_path / "old.pt", gatekit_version="0.0.1")
    assert torch.equal(gatekit.load(path)(X), gated(X))
    path = _saved(gated, tmp_path / "no-checksum.pt", checksum=None)  # written before checksums
    assert torch.equal(gatekit.load(path)(X), gated(X))


@pytest.mark.parametrize("edits, match", [
    (dict(model=None), "lacks 'model'"),
    (dict(state_dict=None), "lacks 'state_dict'"),
    (dict(model_kwargs=[7]), "malformed 'model_kwargs'"),
    (dict(input_shape="1,3,32,32"), "malformed 'input_shape'"),
    (dict(input_shape=[1, 3, 0, 32]), "malformed 'input_shape'"),
    (dict(model="cifar/resnet9"), "unknown model 'cifar/resnet9'"),
    (dict(model_kwargs=lambda kwargs: {**kwargs, "width": 2}, gatekit_version="9.0"),
     r"written by gatekit 9.0 with arguments.*'width'.*Load it with that version"),
    (dict(convert_options=lambda options: {**options, "gate_dropout": 0.1}, gatekit_version="9.0"),
     r"written by gatekit 9.0.*'gate_dropout'"),
    (dict(state_dict=lambda weights: {**weights, "fc.bias": weights["fc.bias"] + 1}), "corrupt: its weights do not match"),
])
def test_edited_checkpoints_say_what_is_wrong(gated, tmp_path, edits, match):
    path = _saved(gated, tmp_path / "edited.pt", **edits)
    with pytest.raises(gatekit.GatekitError, match=match):
        gatekit.load(path)


def test_a_damaged_byte_in_the_weights_is_detected(gated, tmp_path):
    """torch.load does not check the zip's CRCs: a flipped weight byte would load silently."""
    gatekit.save(gated, tmp_path / "model.pt")
    data = bytearray((tmp_path / "model.pt").read_bytes())
    weight = gated.get_submodule("layer3.0.conv2").weight.detach().numpy().tobytes()
    start = data.find(weight)
    assert start > 0, "the weight's bytes are stored as they are"
    for offset in (0, len(weight) // 2, len(weight) - 1):
        damaged = bytearray(data)
        damaged[start + offset] ^= 0x10
        (tmp_path / "damaged.pt").write_bytes(damaged)
        with pytest.raises(gatekit.GatekitError, match="corrupt"):
            gatekit.load(tmp_path / "damaged.pt")


class ShellExploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["raw pickle", "inside a torch.save zip"])
def test_a_checkpoint_holding_code_never_runs_it(gated, tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "raw pickle":
        path.write_bytes(pickle.dumps(ShellExploit(marker)))
    else:
        gatekit.save(gated, path)
        checkpoint = torch.load(path, weights_only=True)
        torch.save({**checkpoint, "model_kwargs": {"payload": ShellExploit(marker)}}, path)
    with pytest.raises(gatekit.GatekitError, match="not a readable gatekit checkpoint"):
        gatekit.load(path)
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_loading_onto_a_missing_device_names_the_device_not_the_file(gated, tmp_path):
    gatekit.save(gated, tmp_path / "model.pt")
    with pytest.raises(gatekit.GatekitError, match="map_location='cuda' cannot be used on this machine"):
        gatekit.load(tmp_path / "model.pt", map_location="cuda")
