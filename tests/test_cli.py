import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gatekit
from gatekit.adapters import get_model
from gatekit.cli import main


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small Fashion-MNIST-format .npz: 28 x 28 uint8 images whose brightness gives the class."""
    root = tmp_path_factory.mktemp("data")
    labels = np.arange(200) % 10
    images = (np.random.default_rng(0).random((200, 28, 28)) * 50 + labels[:, None, None] * 20).astype(np.uint8)
    np.savez(root / "fashion_mnist.npz", x_train=images, y_train=labels, x_test=images[:100], y_test=labels[:100])
    return root


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    """A briefly finetuned gated mnist/resnet8, saved with gatekit.save."""
    from gatekit.datasets import load_dataset

    torch.manual_seed(0)
    images, labels = load_dataset("fashion-mnist", split="train", root=data_root).tensors
    gated = gatekit.convert(get_model("mnist/resnet8"), example_input=images[:1],
                            regularizer=gatekit.SparsityLoss(layer=0.5, channel=0.5))
    optimizer = torch.optim.SGD(gatekit.param_groups(gated), lr=0.05, momentum=0.9)
    for step in range(10):
        batch = slice(step * 16, step * 16 + 16)
        loss = torch.nn.functional.cross_entropy(gated(images[batch]), labels[batch]) + gatekit.gate_loss(gated)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("model") / "gated.pt"
    gatekit.save(gated, path)
    return path


def test_profile_a_checkpoint_end_to_end(checkpoint, data_root, tmp_path, capsys):
    status = main(["profile", str(checkpoint), "--dataset", "fashion-mnist", "--data-root", str(data_root),
                   "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"), "--batch-size", "32"])
    assert status == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["samples"] == 100 and 0 <= report["accuracy"] <= 1
    assert report["dense_macs"] == gatekit.load(checkpoint).gatekit.dense_macs
    assert [b["name"] for b in report["blocks"]] == ["layer1.0", "layer2.0", "layer3.0"]
    assert f"{report['dense_macs']:,}" in printed and "accuracy" in printed and "layer3.0" in printed
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_a_named_model_dense_and_converted(capsys):
    assert main(["profile", "cifar/resnet8", "--random", "3,32,32", "--samples", "8", "--quiet"]) == 0
    dense = capsys.readouterr().out
    assert main(["profile", "cifar/resnet8", "--convert", "--gates", "layer", "--random", "3,32,32",
                 "--samples", "8", "--quiet"]) == 0
    gated = capsys.readouterr().out
    assert "layer1.0" not in dense and "layer1.0" in gated and "12,239,488" in dense


def test_console_script_and_help():
    script = [sys.executable, "-m", "gatekit.cli"]
    result = subprocess.run(script + ["--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "profile" in result.stdout and "sites" in result.stdout
    result = subprocess.run(script + ["profile", "--help"], capture_output=True, text=True)
    assert "--dataset" in result.stdout and "examples:" in result.stdout
    result = subprocess.run(script + ["sites", "torchvision/resnet50"], capture_output=True, text=True)
    assert result.returncode == 0 and "layer4.2" in result.stdout and "projection" in result.stdout


def plain_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(get_model("cifar/resnet8").state_dict(), path)
    return path


def corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a checkpoint at all")
    return path


@pytest.mark.parametrize("arguments, match", [
    (["profile", "missing.pt", "--random", "3,32,32"], "no checkpoint at missing.pt"),
    (["profile", corrupt_file, "--random", "3,32,32"], "not a readable gatekit checkpoint"),
    (["profile", plain_state_dict, "--random", "3,32,32"], "not a gatekit checkpoint"),
    (["profile", "cifar/resnet21", "--random", "3,32,32"], "unknown model 'cifar/resnet21'. Did you mean"),
    (["profile", "cifar/resnet8", "--random", "1,28,28"], r"cannot take inputs of shape \(1, 28, 28\)"),
    (["profile", "cifar/resnet8", "--random", "3x32x32"], "C,H,W"),
    (["profile", "cifar/resnet8", "--random", "3,32,32", "--samples", "0"], "--samples 0"),
    (["profile", "cifar/resnet8", "--random", "3,32,32", "--device", "tpu9"], "--device tpu9"),
    (["profile", "cifar/resnet8", "--dataset", "cifar10", "--data-root", "EMPTY"], "GATEKIT_DATA"),
    (["profile", "cifar/resnet8", "--image-folder", "nowhere"], "no such folder"),
    (["sites", "torchvision/resnet9000"], "unknown model"),
])
def test_bad_input_prints_one_line_and_exits_non_zero(arguments, match, tmp_path, capsys):
    arguments = [str(a(tmp_path)) if callable(a) else a for a in arguments]
    arguments = [str(tmp_path) if a == "EMPTY" else a for a in arguments]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("gatekit ") and "Traceback" not in error
    import re
    assert re.search(match, error), error


def test_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "cifar/resnet8", "--dataset", "imagenet"])
    assert exit_info.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_sites_lists_the_blocks_it_cannot_gate_with_their_reasons(monkeypatch, capsys):
    import gatekit.adapters
    from test_partial_blocks import FusionStage, build, images

    monkeypatch.setattr(gatekit.adapters, "get_model", lambda name: build(FusionStage))
    monkeypatch.setattr(gatekit.adapters, "example_input", lambda name: images(1))
    assert main(["sites", "test/fusion"]) == 0
    out = capsys.readouterr().out
    gated, skipped = out.split("not gated (2)")
    assert "high_block" in gated and "low_block" in gated
    assert skipped.count("branch value used outside the branch") == 2 and "add_" in skipped
