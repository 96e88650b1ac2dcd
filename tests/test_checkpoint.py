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
