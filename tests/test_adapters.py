"""The model registry and the torchvision / timm adapters, pretrained weights included, all offline."""
from __future__ import annotations

import os
import urllib.error

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights

import gatekit
from gatekit.adapters import _registry, example_input, get_model, list_models, model_entry, register_model

TORCHVISION_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
]
TIMM_MODELS = ["resnet18", "resnet26d", "resnet34", "resnet50d", "seresnext26d_32x4d"]


# --- registry ---------------------------------------------------------------------------------

def test_list_models_matches_fnmatch_patterns():
    assert list_models("torchvision/*") == sorted(f"torchvision/{name}" for name in TORCHVISION_MODELS)
    assert set(f"timm/{name}" for name in TIMM_MODELS) <= set(list_models("timm/*"))
    assert list_models("cifar/resnet2*") == ["cifar/resnet20"]
    assert list_models("*/resnet18") == ["timm/resnet18", "torchvision/resnet18"]
    assert list_models("no-such-family/*") == []
    assert list_models() == sorted(list_models())


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(gatekit.GatekitError, match=r"unknown model 'torchvision/resnet19'.*Did you mean .*torchvision/resnet18"):
        get_model("torchvision/resnet19")
    with pytest.raises(gatekit.GatekitError, match="list_models"):
        model_entry("nothing/like/it")


def test_duplicate_registration_warns_and_the_later_builder_wins(monkeypatch):
    monkeypatch.setattr(_registry, "_models", dict(_registry._models))
    register_model("test/tiny", input_size=(3, 8, 8))(lambda **kwargs: nn.Identity())
    with pytest.warns(UserWarning, match="'test/tiny' registered twice"):
        register_model("test/tiny", input_size=(1, 4, 4))(lambda **kwargs: nn.Flatten())
    assert isinstance(get_model("test/tiny"), nn.Flatten)
    assert model_entry("test/tiny").input_size == (1, 4, 4)


def test_get_model_forwards_keyword_arguments():
    assert get_model("torchvision/resnet18", num_classes=7).fc.out_features == 7
    assert get_model("timm/resnet18", num_classes=5).fc.out_features == 5
    assert get_model("cifar/resnet20", num_classes=3).fc.out_features == 3
    assert get_model("mnist/resnet20", in_chans=2).conv1.in_channels == 2


@pytest.mark.parametrize(
    "name, shape",
    [("cifar/resnet20", (3, 32, 32)), ("mnist/resnet8", (1, 28, 28)),
     ("torchvision/resnet50", (3, 224, 224)), ("timm/resnet26d", (3, 224, 224))],
)
def test_example_input_has_the_registered_shape(name, shape):
    assert model_entry(name).input_size == shape
    assert example_input(name).shape == (1, *shape)
    assert example_input(name, batch_size=3).shape == (3, *shape)


def test_failing_entry_point_names_the_adapter(monkeypatch):
    class BrokenEntryPoint:
        name, value = "broken", "broken_package.adapter"

        def load(self):
            raise ImportError("no module named broken_package")

    monkeypatch.setattr(_registry, "_loaded", False)
    monkeypatch.setattr(_registry.metadata, "entry_points", lambda group: [BrokenEntryPoint()])
    with pytest.raises(gatekit.GatekitError, match=r"adapter 'broken' \(broken_package.adapter\) failed to load"):
        list_models()


# --- torchvision weights ----------------------------------------------------------------------

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A private TORCH_HOME, so that torchvision finds checkpoints the test writes and no others."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub"
    if os.path.realpath(torch.hub.get_dir()) != os.path.realpath(hub):
        # torch.hub.set_dir() was called and outranks TORCH_HOME: override it for this test only.
        monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    assert os.path.realpath(torch.hub.get_dir()) == os.path.realpath(hub)
    return hub


def _cache_checkpoint(hub, weights, state_dict) -> None:
    checkpoints = hub / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, checkpoints / os.path.basename(weights.url))


@pytest.mark.parametrize(
    "weights",
    ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1", ResNet18_Weights.IMAGENET1K_V1],
)
def test_torchvision_weights_load_from_the_hub_cache(torch_home, weights):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    _cache_checkpoint(torch_home, ResNet18_Weights.IMAGENET1K_V1, reference.state_dict())
    torch.manual_seed(1)  # a different random init: only loading can make the weights equal
    model = get_model("torchvision/resnet18", weights=weights)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_torchvision_without_weights_is_randomly_initialised(torch_home):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    _cache_checkpoint(torch_home, ResNet18_Weights.IMAGENET1K_V1, reference.state_dict())
    torch.manual_seed(1)
    assert not torch.equal(get_model("torchvision/resnet18").conv1.weight, reference.conv1.weight)


@pytest.mark.parametrize("weights", ["IMAGENET1K_V9", "imagenet1k_v1", ResNet50_Weights.IMAGENET1K_V2])
def test_unknown_torchvision_weights_list_the_valid_names(weights):
    with pytest.raises(gatekit.GatekitError, match="IMAGENET1K_V1, DEFAULT"):
        get_model("torchvision/resnet18", weights=weights)


def test_weights_neither_cached_nor_downloadable_say_where_to_put_them(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(gatekit.GatekitError, match=r"resnet18-f37072fd\.pth into .*checkpoints"):
        get_model("torchvision/resnet18", weights="DEFAULT")


# --- timm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_build_without_pretrained_weights(name):
    model = get_model(f"timm/{name}", num_classes=10)
    assert isinstance(model, timm.models.ResNet)
    assert model.fc.out_features == 10


def test_timm_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("resnet18")
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    torch.manual_seed(1)
    model = get_model("timm/resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "resnet18.pth")))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.fc.weight, reference.fc.weight)


def test_timm_drop_modules_stay_whole_and_keep_training_behaviour():
    torch.manual_seed(0)
    model = get_model("timm/resnet18", drop_path_rate=0.5, drop_block_rate=0.5).eval()
    gated = gatekit.convert(model, example_input=torch.randn(1, 3, 64, 64))
    targets = {node.target for node in gated.graph.nodes if node.op == "call_module"}
    assert "layer4.1.drop_path" in targets and "layer4.1.drop_block" in targets
    site = next(site for site in gated.gatekit.sites if site.name == "layer4.1")
    assert site.channelwise_ops == ("layer4.1.bn1", "layer4.1.drop_block", "layer4.1.act1", "layer4.1.aa")
    # As call_module nodes they run the module's forward, which reads `self.training` at run time:
    # converted in eval mode, the model still drops paths and blocks once it trains.
    assert isinstance(gated.get_submodule("layer4.1.drop_path"), timm.layers.DropPath)
    assert isinstance(gated.get_submodule("layer4.1.drop_block"), timm.layers.DropBlock2d)
