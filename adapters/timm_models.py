"""timm's residual families beyond its ResNet: pre-activation ResNetV2, MobileNetV2/V3, EfficientNet,
RegNet and ConvNeXt, by name.

``get_model("timm/convnext_atto")`` builds ``timm.create_model("convnext_atto", pretrained=False)``;
``pretrained=`` works as for timm's ResNets (:mod:`gatekit.adapters.timm_resnet`, which also hands
timm's tracing hints to gatekit). The names only make these models buildable by name: gatekit finds
their blocks from the graph like any other model's (docs/coverage.md).
"""
from __future__ import annotations

from .timm_resnet import register

MODELS = (
    "resnetv2_50", "seresnet18", "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100",
    "efficientnet_b0", "regnetx_002", "regnety_002", "convnext_atto", "convnext_tiny",
)

for _name in MODELS:
    register(_name)
