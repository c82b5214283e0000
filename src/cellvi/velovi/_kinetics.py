"""Closed-form solutions of the switching transcription ODE (torch, broadcasting over any leading dims).

``du/dt = alpha(t) - beta u``, ``ds/dt = beta u - gamma s``, ``u(0) = s(0) = 0``; transcription stops at the
switch time and repression starts from the abundances reached there.
"""

from __future__ import annotations

import torch

EPS = 1e-6


#: rate differences below this use the second-order limit in :func:`exp_diff`
_NEAR_EQUAL = 1e-4


def _expm1_only(d: torch.Tensor, small: torch.Tensor | None = None) -> bool:
    """Inference with per-gene rate differences ``d``, none near-equal (``small``, computed when not
    given, all False): the ``expm1`` formula alone gives the value (no limit branch to keep)."""
    if torch.is_grad_enabled() or d.dim() > 1:
        return False
    return not bool((d.abs() < _NEAR_EQUAL if small is None else small).any())


def exp_diff(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(exp(-a t) - exp(-b t)) / (b - a)``, finite and exact as ``a -> b`` (limit ``t exp(-a t)``).

    The original divides by ``gamma - beta + 1e-6``, which is wrong near ``gamma = beta`` and infinite at
    ``gamma - beta = -1e-6``; ``expm1`` with an explicit second-order limit avoids both.
    """
    d = b - a
    small = d.abs() < _NEAR_EQUAL
    if _expm1_only(d, small):
        # inference with per-gene rates, none near-equal: the expm1 branch alone (the same values;
        # 6 instead of 12 passes over t's (samples, cells, genes))
        neg_d = -d
        return torch.exp(-a * t).mul_(torch.expm1(neg_d * t).div_(neg_d))
    safe = torch.where(small, torch.ones_like(d), d)
    dt = d * t
    ratio = torch.where(small, t * (1 - 0.5 * dt), -torch.expm1(-dt) / safe)
    return torch.exp(-a * t) * ratio


def _safe_denominator(d: torch.Tensor) -> torch.Tensor:
    """``d`` moved away from zero by ``EPS`` keeping its sign (zero counts as positive)."""
    return torch.where(d >= 0, d + EPS, d - EPS)


def induction(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    t: torch.Tensor,
    alpha_1: torch.Tensor | None = None,
    lambda_alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u(t), s(t))`` during induction from ``(0, 0)``.

    With ``alpha_1``/``lambda_alpha`` the transcription rate rises in time,
    ``alpha(t) = alpha_1 - (alpha_1 - alpha) exp(-lambda_alpha t)``.
    """
    if alpha_1 is None:
        u = torch.expm1(-beta * t) * -(alpha / beta)  # the per-gene factor negated, not the array
        s = torch.expm1(-gamma * t) * -(alpha / gamma) - alpha * exp_diff(gamma, beta, t)
        return u, s
    a1, lam = alpha_1, lambda_alpha
    delta = a1 - alpha
    u = a1 / beta * -torch.expm1(-beta * t) - delta * exp_diff(lam, beta, t)
    s = (
        a1 / gamma * -torch.expm1(-gamma * t)
        - a1 * exp_diff(gamma, beta, t)
        + beta * delta / _safe_denominator(beta - lam) * (exp_diff(beta, gamma, t) - exp_diff(lam, gamma, t))
    )
    return u, s


def repression(
    u0: torch.Tensor, s0: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, s)`` a time ``tau`` after transcription stopped at ``(u0, s0)``."""
    u = u0 * torch.exp(-beta * tau)
    d = beta - gamma
    if _expm1_only(d):
        # inference, per-gene rates, none near-equal: exp(-gamma tau) once,
        # s = exp(-gamma tau) (s0 + beta u0 (1 - exp(-d tau)) / d) (the same value as below)
        neg_d = -d
        ratio = torch.expm1(neg_d * tau).div_(neg_d).mul_(beta * u0).add_(s0)
        return u, torch.exp(-gamma * tau).mul_(ratio)
    s = s0 * torch.exp(-gamma * tau) + beta * u0 * exp_diff(gamma, beta, tau)
    return u, s


def transcription_rate(
    alpha: torch.Tensor, t: torch.Tensor, alpha_1: torch.Tensor | None, lambda_alpha: torch.Tensor | None
) -> torch.Tensor:
    """``alpha(t)`` during induction: constant ``alpha``, or rising from ``alpha`` to ``alpha_1``."""
    if alpha_1 is None:
        return alpha.expand_as(t)
    return alpha_1 - (alpha_1 - alpha) * torch.exp(-lambda_alpha * t)
