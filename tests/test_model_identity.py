"""gatekit.save on models that torchvision's and timm's own builders made, pruned ones, and ones whose
builder the user names: each saves, loads with the same outputs, and is read by `gatekit profile`."""
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

import gatekit
from gatekit.adapters import get_model, load_adapters
from gatekit.adapters._registry import ModelEntry, _models
from gatekit.cli import main
from test_macs import randomize_gates
from toy_models import ToyResNet

X = torch.randn(3, 3, 64, 64)


def pruned_resnet18() -> nn.Module:
    """torchvision's resnet18 with half of its channels removed by Torch-Pruning, classifier kept."""
    torch_pruning = pytest.importorskip("torch_pruning")
    model = torchvision.models.resnet18(num_classes=10).eval()
    pruner = torch_pruning.pruner.MagnitudePruner(
        model, X[:1], importance=torch_pruning.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[model.fc],
    )
    pruner.step()
    assert model.layer1[0].conv1.out_channels == 32  # 64 before
    return model


MODELS = {
    "torchvision:resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision:mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "timm:resnet50d": lambda: timm.create_model("resnet50d", num_classes=10),
    "pruned torchvision:resnet18": pruned_resnet18,
}


def saved_and_loaded(model, path, **save_options):
    gatekit.save(model, path, **save_options)
    return gatekit.load(path), torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", MODELS)
def test_a_converted_model_of_a_library_builder_saves_and_loads(name, tmp_path):
    torch.manual_seed(0)
    gated = gatekit.convert(MODELS[name]().eval(), example_input=X[:1]).eval()
    randomize_gates(gated)
    loaded, checkpoint = saved_and_loaded(gated, tmp_path / "gated.pt")
    assert checkpoint["model"] == name.removeprefix("pruned ")
    assert checkpoint["model_kwargs"]["num_classes"] == 10
    assert ("layer_shapes" in checkpoint) == name.startswith("pruned")
    assert torch.equal(loaded(X), gated(X))
    assert [s.name for s in loaded.gatekit.sites] == [s.name for s in gated.gatekit.sites]


def test_a_pruned_model_is_rebuilt_from_saved_sizes_not_code(tmp_path):
    _, checkpoint = saved_and_loaded(gatekit.convert(pruned_resnet18(), example_input=X[:1]), tmp_path / "p.pt")
    first = checkpoint["layer_shapes"]["layer1.0.conv1"]
    assert first == {"attributes": {"in_channels": 32, "out_channels": 32, "groups": 1},
                     "tensors": {"weight": [32, 32, 3, 3]}}
    # The classifier keeps its 10 outputs and its bias: only what pruning changed is saved.
    assert checkpoint["layer_shapes"]["fc"] == {"attributes": {"in_features": 256, "out_features": 10},
                                                "tensors": {"weight": [10, 256]}}


def test_a_dense_model_of_a_library_builder_saves_and_loads(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    loaded, checkpoint = saved_and_loaded(model, tmp_path / "dense.pt")
    assert checkpoint["convert_options"] is None and checkpoint["input_shape"] == [1, 3, 224, 224]
    assert torch.equal(loaded(X), model(X))


def test_a_model_built_by_name_then_pruned_keeps_its_name(tmp_path):
    torch_pruning = pytest.importorskip("torch_pruning")
    model = get_model("cifar/resnet8", shortcut="B", num_classes=7).eval()
    example = torch.randn(1, 3, 32, 32)
    pruner = torch_pruning.pruner.MagnitudePruner(model, example, importance=torch_pruning.importance.MagnitudeImportance(),
                                                  pruning_ratio=0.25, ignored_layers=[model.fc])
    pruner.step()
    gated = gatekit.convert(model, example_input=example).eval()
    loaded, checkpoint = saved_and_loaded(gated, tmp_path / "pruned.pt")
    assert checkpoint["model"] == "cifar/resnet8" and checkpoint["layer_shapes"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), gated(x))


@pytest.fixture
def toy_builder(monkeypatch):
    """ToyResNet registered as `register_model` would, for this test only (the zoo tests list every model)."""
    load_adapters()
    monkeypatch.setitem(_models, "tests/toy-resnet", ModelEntry("tests/toy-resnet", ToyResNet, (3, 16, 16)))


def test_builder_names_the_registered_builder_of_a_home_made_model(toy_builder, tmp_path):
    gated = gatekit.convert(ToyResNet().eval(), example_input=torch.randn(1, 3, 16, 16)).eval()
    randomize_gates(gated)
    loaded, checkpoint = saved_and_loaded(gated, tmp_path / "toy.pt", builder="tests/toy-resnet")
    assert checkpoint["model"] == "tests/toy-resnet" and checkpoint["model_kwargs"] == {}
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), gated(x))


@pytest.mark.parametrize("builder, match", [
    ("cifar/resnet8", r"ToyResNet is not what cifar/resnet8\(\) builds: it lacks"),
    (("tests/toy-resnet", {"width": 3}), r"cannot call the model's builder tests/toy-resnet\(width=3\) \(TypeError"),
    ("tests/toy-resnet9", "unknown model 'tests/toy-resnet9'"),
    (("tests/toy-resnet", {"init": nn.init.zeros_}), "plain data only"),
    (["tests/toy-resnet"], r"give a registered model's name, or \(name, kwargs\)"),
])
def test_a_wrong_builder_is_refused_when_saving(builder, match, toy_builder, tmp_path):
    gated = gatekit.convert(ToyResNet(), example_input=torch.randn(1, 3, 16, 16))
    with pytest.raises(gatekit.GatekitError, match=match):
        gatekit.save(gated, tmp_path / "toy.pt", builder=builder)
    assert not (tmp_path / "toy.pt").exists()


def test_a_model_no_builder_makes_names_the_fix(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    model.fc = nn.Sequential(nn.Dropout(), nn.Linear(512, 10))  # keys no torchvision builder has
    with pytest.raises(gatekit.GatekitError, match=r"torchvision.models.resnet.ResNet was not built by .*"
                       r"\(tried torchvision:resnet18, .*builder=\('family/name'"):
        gatekit.save(gatekit.convert(model, example_input=X[:1]), tmp_path / "m.pt")


@pytest.mark.parametrize("edit, match", [
    (dict(model_kwargs={"num_classes": 10, "checkpoint_path": "/etc/passwd"}), "takes only num_classes, in_chans"),
    (dict(model="timm:resnet50z"), "timm has no model 'resnet50z'"),
    (dict(layer_shapes={"layer9": {"attributes": {}, "tensors": {}}}), "malformed 'layer_shapes'.*no module 'layer9'"),
    (dict(layer_shapes={"layer1.0.conv1": {"attributes": {"forward": 1}, "tensors": {}}}), "not a layer size"),
    (dict(layer_shapes={"layer1.0.conv1": {"attributes": {}, "tensors": {"weight": "32"}}}), "not a list of sizes"),
])
def test_edited_library_checkpoints_say_what_is_wrong(edit, match, tmp_path):
    path = tmp_path / "edited.pt"
    gatekit.save(timm.create_model("resnet18", num_classes=10), path)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, **edit}, path)
    with pytest.raises(gatekit.GatekitError, match=match):
        gatekit.load(path)


def test_gatekit_profile_reads_a_checkpoint_of_a_torchvision_model(tmp_path, capsys):
    gated = gatekit.convert(torchvision.models.mobilenet_v2(num_classes=10), example_input=X[:1])
    gatekit.save(gated, tmp_path / "gated.pt")
    status = main(["profile", str(tmp_path / "gated.pt"), "--random", "3,64,64", "--samples", "4", "--quiet",
                   "--json", str(tmp_path / "profile.json")])
    assert status == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["samples"] == 4 and report["dense_macs"] == gated.gatekit.dense_macs
    assert [b["name"] for b in report["blocks"]] == [s.name for s in gated.gatekit.sites]
    assert f"{gated.gatekit.dense_macs:,}" in capsys.readouterr().out


def test_the_readme_example_saves_loads_and_profiles_as_written(tmp_path, monkeypatch):
    """README.md, "Use it in your training loop", with weights=None (no download) and a tiny loader."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    loader = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
    model = torchvision.models.resnet18(weights=None)
    gated = gatekit.convert(model, regularizer=gatekit.SparsityLoss(layer=0.002, channel=0.002))
    optimizer = torch.optim.SGD(gatekit.param_groups(gated, weight_decay=5e-4), lr=0.01, momentum=0.9, nesterov=True)
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(gated(images), labels) + gatekit.gate_loss(gated)
        optimizer.zero_grad(); loss.backward(); optimizer.step()  # noqa: E702  (as the README writes it)
    gatekit.save(gated, "gated.pt")
    loaded = gatekit.load("gated.pt")
    assert torch.equal(loaded(X), gated.eval()(X))
    assert main(["profile", "gated.pt", "--random", "3,64,64", "--samples", "2", "--quiet"]) == 0
