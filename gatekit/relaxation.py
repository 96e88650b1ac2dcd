"""Binary gate decisions with the Gumbel trick and a sigmoid relaxation (paper section 3.2)."""
from __future__ import annotations

import torch
from torch import Tensor


def gumbel_sigmoid(logits: Tensor, temperature: float = 1.0, *, hard: bool = True, noise: float = 1.0) -> Tensor:
    """Sample relaxed Bernoulli gates with probability ``sigmoid(logits / noise)`` of being on.

    The difference of two Gumbel variables is logistic, so ``logits + log(u) - log(1 - u)`` is the
    two-class Gumbel-max trick. With ``hard=True`` the forward value is exactly 0 or 1 and the
    gradient is the relaxed sample's (straight-through). ``noise`` scales the logistic noise: at 0
    the forward decision is the deterministic eval-mode threshold (``logits > 0``), with the same
    straight-through gradient, so training sees the network that is deployed.

    >>> gates = gumbel_sigmoid(torch.zeros(4, 8), temperature=0.5)
    >>> bool(((gates == 0) | (gates == 1)).all())
    True
    """
    noisy_logits = logits
    if noise:
        uniform = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        noisy_logits = logits + noise * (torch.log(uniform) - torch.log1p(-uniform))
    relaxed = torch.sigmoid(noisy_logits / temperature)
    if not hard:
        return relaxed
    decision = (noisy_logits > 0).to(logits.dtype)
    # relaxed - relaxed.detach() is exactly zero, so the forward value stays exactly 0 or 1.
    return decision + (relaxed - relaxed.detach())


def threshold(logits: Tensor) -> Tensor:
    """Deterministic inference decisions: a gate is on when its probability exceeds one half."""
    return (logits > 0).to(logits.dtype)
