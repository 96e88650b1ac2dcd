"""Exit heads: a cheap classifier on a residual block's output, so that easy inputs can leave early."""
from __future__ import annotations

from torch import Tensor, nn


class ExitHead(nn.Module):
    """Average pool to ``pool`` x ``pool``, then a linear classifier (or a one-hidden-layer MLP).

    The pool has no parameters, so :func:`gatekit.fit_exits` can compute it once per image and fit
    only ``classifier``. MACs follow gatekit's convention: the linear layers alone.

    Args:
        channels: channels of the block output the head reads.
        classes: classes of the model's own classifier.
        pool: side of the pooled feature map (4: 16 values per channel).
        hidden: width of a hidden layer with a ReLU; 0 for a single linear layer.
    """

    def __init__(self, channels: int, classes: int, *, pool: int = 4, hidden: int = 0) -> None:
        super().__init__()
        self.channels, self.classes, self.pool_size, self.hidden = channels, classes, pool, hidden
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(1))
        features = channels * pool * pool
        if hidden:
            self.classifier = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(features, classes))

    @property
    def macs(self) -> int:
        """Per-sample MACs of the head's linear layers."""
        return sum(layer.in_features * layer.out_features for layer in self.classifier if isinstance(layer, nn.Linear))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, classes={self.classes}, pool={self.pool_size}, hidden={self.hidden}"
