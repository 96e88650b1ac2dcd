"""A differentiable Beta cumulative distribution function, which torch does not provide.

The forward pass evaluates the regularized incomplete beta function I_x(a, b) with the continued
fraction of Numerical Recipes (``betacf``, modified Lentz method), vectorised in float64. Only the
derivative in ``x`` is needed by the batch-shaping loss, and it is the Beta pdf.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from ..errors import GatekitError

# The continued fraction converges in O(sqrt(max(a, b))) terms once the symmetry below is applied;
# 300 covers shape parameters into the tens of thousands.
_MAX_TERMS = 300
_TOLERANCE = 1e-14
_TINY = 1e-300  # Lentz's method replaces zero denominators by this to avoid dividing by zero.
# The pdf is infinite at 0 or 1 when a < 1 or b < 1; sigmoid outputs reach exactly 0 or 1 in float32,
# where an infinite pdf times a zero sigmoid derivative would give NaN instead of a zero gradient.
_PDF_MARGIN = 1e-6


def beta_cdf(x: Tensor, alpha: float, beta: float) -> Tensor:
    """Evaluate the CDF of a Beta(alpha, beta) distribution at ``x``, differentiably in ``x``.

    Args:
        x: values in [0, 1], any shape; the result has its shape, dtype and device.
        alpha: first shape parameter, > 0.
        beta: second shape parameter, > 0.

    Returns:
        ``I_x(alpha, beta)``, the regularized incomplete beta function; its gradient in ``x`` is the
        Beta pdf (evaluated at ``x`` clamped to [1e-6, 1 - 1e-6], so it stays finite).

    Raises:
        GatekitError: a shape parameter is not positive, ``x`` leaves [0, 1], or the continued
            fraction does not converge (shape parameters far too large).

    >>> beta_cdf(torch.tensor([0.25, 0.5]), 2.0, 1.0)
    tensor([0.0625, 0.2500])
    """
    check_shape_parameters(alpha, beta)
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise GatekitError("beta_cdf needs probabilities in [0, 1]; apply a sigmoid to logits first.")
    return _BetaCdf.apply(x, float(alpha), float(beta))


def check_shape_parameters(alpha: float, beta: float) -> None:
    """Raise GatekitError unless both Beta shape parameters are finite and positive."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
            raise GatekitError(f"{name}={value!r}: the Beta shape parameters must be positive numbers.")


class _BetaCdf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float, beta: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha, ctx.beta = alpha, beta
        return _incomplete_beta(x.detach().double(), alpha, beta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        pdf = _beta_pdf(x.double(), ctx.alpha, ctx.beta).to(grad_output.dtype)
        return grad_output * pdf, None, None


def _beta_pdf(x: Tensor, alpha: float, beta: float) -> Tensor:
    x = x.clamp(_PDF_MARGIN, 1 - _PDF_MARGIN)
    log_pdf = (alpha - 1) * torch.log(x) + (beta - 1) * torch.log1p(-x) - _log_beta(alpha, beta)
    return torch.exp(log_pdf)


def _log_beta(alpha: float, beta: float) -> float:
    return math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)


def _incomplete_beta(x: Tensor, alpha: float, beta: float) -> Tensor:
    """I_x(a, b) in float64 (Numerical Recipes ``betai``)."""
    interior = (x > 0) & (x < 1)
    safe = torch.where(interior, x, torch.full_like(x, 0.5))
    # x^a (1-x)^b / B(a, b), the prefactor shared by both sides of the symmetry.
    front = torch.exp(alpha * torch.log(safe) + beta * torch.log1p(-safe) - _log_beta(alpha, beta))
    # The continued fraction converges fast only below the distribution's bulk; above it use
    # I_x(a, b) = 1 - I_{1-x}(b, a). Each element is evaluated on its own side only: the other side
    # may need thousands of terms.
    flipped = safe > (alpha + 1) / (alpha + beta + 2)
    a = torch.where(flipped, beta, alpha)
    b = torch.where(flipped, alpha, beta)
    tail = front * _continued_fraction(torch.where(flipped, 1 - safe, safe), a, b) / a
    value = torch.where(flipped, 1 - tail, tail)
    return torch.where(interior, value, (x >= 1).to(x.dtype))


def _continued_fraction(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Numerical Recipes ``betacf``: the continued fraction of I_x(a, b), by the modified Lentz method."""
    def guard(values: Tensor) -> Tensor:
        return torch.where(values.abs() < _TINY, torch.full_like(values, _TINY), values)

    c = torch.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    fraction = d.clone()
    for m in range(1, _MAX_TERMS + 1):
        even = m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m))
        d = 1 / guard(1 + even * d)
        c = guard(1 + even / c)
        fraction = fraction * d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m))
        d = 1 / guard(1 + odd * d)
        c = guard(1 + odd / c)
        step = d * c
        fraction = fraction * step
        if bool(((step - 1).abs() < _TOLERANCE).all()):
            return fraction
    raise GatekitError(
        f"the incomplete beta continued fraction did not converge in {_MAX_TERMS} terms; use Beta "
        f"shape parameters below a few thousand."
    )
