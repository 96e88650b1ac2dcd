"""Binary gate decisions with the Gumbel trick and a sigmoid relaxation (paper section 3.2), and the
top-k decisions of FBS (Gao et al., 2019) that keep a fixed number of filters per input."""
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
    noisy_logits = _with_logistic_noise(logits, noise)
    relaxed = torch.sigmoid(noisy_logits / temperature)
    if not hard:
        return relaxed
    decision = (noisy_logits > 0).to(logits.dtype)
    # relaxed - relaxed.detach() is exactly zero, so the forward value stays exactly 0 or 1.
    return decision + (relaxed - relaxed.detach())


def threshold(logits: Tensor) -> Tensor:
    """Deterministic inference decisions: a gate is on when its probability exceeds one half."""
    return (logits > 0).to(logits.dtype)


def top_k_sigmoid(logits: Tensor, keep: int, temperature: float = 1.0, *, noise: float = 1.0) -> Tensor:
    """Training decisions of a top-k gate: 1 on the ``keep`` largest logits of each row, 0 elsewhere.

    The forward value is exactly the mask; the gradient is that of ``sigmoid(logits / temperature)``
    (straight-through), as for :func:`gumbel_sigmoid`. ``noise`` adds the same logistic noise to the
    logits first (relaxation included); at 0 the mask is :func:`top_k`'s, the eval-mode decisions.

    >>> gates = top_k_sigmoid(torch.randn(4, 8), keep=3)
    >>> gates.sum(1).tolist()
    [3.0, 3.0, 3.0, 3.0]
    """
    noisy_logits = _with_logistic_noise(logits, noise)
    relaxed = torch.sigmoid(noisy_logits / temperature)
    return top_k(noisy_logits.detach(), keep) + (relaxed - relaxed.detach())


def top_k(logits: Tensor, keep: int) -> Tensor:
    """Deterministic top-k decisions: 1 on the ``keep`` largest logits of each row (ties as
    ``torch.topk`` breaks them), 0 elsewhere, in the logits' dtype. A ``topk`` and a ``scatter``, so
    the decisions export to ONNX.

    >>> top_k(torch.tensor([[0.5, -1.0, 2.0, 0.1]]), keep=2)
    tensor([[1., 0., 1., 0.]])
    """
    indices = logits.topk(keep, dim=-1).indices
    return torch.zeros_like(logits).scatter(-1, indices, torch.ones_like(indices, dtype=logits.dtype))


def _with_logistic_noise(logits: Tensor, noise: float) -> Tensor:
    """``logits + noise * L``, L logistic: the difference of two Gumbel variables."""
    if not noise:
        return logits
    uniform = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    return logits + noise * (torch.log(uniform) - torch.log1p(-uniform))
