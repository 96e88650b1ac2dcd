"""The exit decision: per sample, the first exit whose head is confident enough, or the final head.

:func:`gatekit.add_exits` puts one :class:`ExitPolicy` in front of a model's output. It sees every
exit head's logits and the final logits. In eval mode it returns, per sample, the logits of the exit
it took and records that exit in ``taken``; in training mode it returns the final logits, so a
training loop does not change, and keeps the exits' logits for :func:`gatekit.exit_loss`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

RULES = ("probability", "margin", "entropy")


def confidence(logits: Tensor, rule: str) -> Tensor:
    """Per-sample confidence in [0, 1] of a head's prediction, [B]: the top softmax probability,
    the gap between the two top probabilities, or one minus the entropy over its maximum."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    if rule == "probability":
        return probabilities.amax(-1)
    if rule == "margin":
        top = probabilities.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)
    return 1 - entropy / math.log(logits.shape[-1])


class ExitPolicy(nn.Module):
    """Thresholds per exit; a sample leaves at the first exit whose confidence reaches its threshold.

    ``thresholds`` start at infinity, so a fresh model never leaves early and computes what it did
    before; :func:`gatekit.calibrate_exits` sets them. ``temperatures`` divide each head's logits
    before the confidence is taken (1: none).

    After a forward: ``exit_logits`` (one tensor per exit) and ``final_logits``; in eval mode also
    ``taken``, each sample's exit index, ``len(thresholds)`` for the final head.
    """

    def __init__(self, exits: int, *, rule: str = "probability") -> None:
        super().__init__()
        self.rule = rule
        self.register_buffer("thresholds", torch.full((exits,), math.inf))
        self.register_buffer("temperatures", torch.ones(exits))
        self.exit_logits: tuple[Tensor, ...] | None = None
        self.final_logits: Tensor | None = None
        self.taken: Tensor | None = None

    def forget(self) -> None:
        """Drop the records of the last forward."""
        self.exit_logits = self.final_logits = self.taken = None

    def confidences(self, exit_logits: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        """Per-sample confidence of every exit, [B, exits]."""
        return torch.stack(
            [confidence(logits / temperature, self.rule) for logits, temperature in zip(exit_logits, self.temperatures)], 1
        )

    def decide(self, confidences: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """Each sample's exit index from its confidences [B, exits]: the first that reaches its
        threshold, or ``exits`` (the final head) where none does."""
        thresholds = self.thresholds if thresholds is None else thresholds
        leaves = confidences >= thresholds
        leaves = torch.cat([leaves, leaves.new_ones(leaves.shape[0], 1)], 1)
        return leaves.to(torch.uint8).argmax(1)  # argmax returns the first maximum

    def forward(self, final: Tensor, *exit_logits: Tensor) -> Tensor:
        self.exit_logits, self.final_logits = exit_logits, final
        if self.training:
            self.taken = None
            return final
        taken = self.decide(self.confidences(exit_logits))
        self.taken = taken
        every = torch.stack([*exit_logits, final], 1)  # [B, exits + 1, classes]
        return every[torch.arange(every.shape[0], device=every.device), taken]

    def extra_repr(self) -> str:
        return f"exits={len(self.thresholds)}, rule={self.rule!r}"
