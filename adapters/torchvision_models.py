"""torchvision's residual families beyond ResNet: MobileNetV2/V3, EfficientNet, RegNet, ConvNeXt, by name.

``get_model("torchvision/mobilenet_v2")`` builds ``torchvision.models.get_model("mobilenet_v2")``;
``weights=`` works as for the ResNets (:mod:`gatekit.adapters.torchvision_resnet`). gatekit finds their
blocks from the graph like any other model's: the names here only make them buildable by name (for
``gatekit sites``, ``gatekit.save`` and the coverage table, docs/coverage.md).
"""
from __future__ import annotations

from torchvision.ops import StochasticDepth

from gatekit._tracing import register_tracing_hints
from gatekit.blocks import register_channelwise_module

from .torchvision_resnet import register

MODELS = (
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
)

# StochasticDepth (EfficientNet, ConvNeXt) drops whole samples of a branch, so it treats every
# channel on its own. Traced through, its `training` flag would be frozen into the graph in the mode
# the model was converted in: kept whole, it still drops branches when the gated model trains.
register_channelwise_module(StochasticDepth)
register_tracing_hints(lambda: ((StochasticDepth,), ()))

for _name in MODELS:
    register(_name)
