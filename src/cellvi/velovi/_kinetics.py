"""Closed-form solutions of the switching transcription ODE (torch, broadcasting over any leading dims).

``du/dt = alpha(t) - beta u``, ``ds/dt = beta u - gamma s``, ``u(0) = s(0) = 0``; transcription stops at the
switch time and repression starts from the abundances reached there.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._special import EXP_FLOOR

EPS = 1e-6


#: rate differences below this use the Taylor expansion (to d^2) in :func:`exp_diff`
_NEAR_EQUAL = 1e-4


def _expm1_only(gap: torch.Tensor) -> bool:
    """Inference with per-gene rate gaps ``gap`` (``>= 0``), none near-equal: the ``expm1`` formula alone
    gives the value (no limit branch to keep)."""
    if torch.is_grad_enabled() or gap.dim() > 1:
        return False
    return not bool((gap < _NEAR_EQUAL).any())


def _taylor_ratio(d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - exp(-d t)) / d`` to ``O(d^3)``: ``t - d t^2 / 2 + d^2 t^3 / 6`` (near-equal rates)."""
    dt = d * t
    return t * (1 - dt * (0.5 - dt / 6))


def _low_and_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The smaller of the rates ``a, b``, their gap ``|b - a|`` and ``b >= a``, selected by the sign of
    ``b - a`` (so that autograd's gradient is the limit's at ``a == b``, where ``minimum``/``abs`` would
    split or drop it)."""
    d = b - a
    b_larger = d >= 0
    return torch.where(b_larger, a, b), torch.where(b_larger, d, -d), b_larger


def _gap_ratio(gap: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``F = (1 - exp(-gap t)) / gap`` (:func:`_taylor_ratio` for near-equal rates) and its parts
    ``(F, expm1(-gap t), small, safe)``: ``small`` marks the near-equal genes, ``safe`` is ``gap`` with 1 there.
    The expm1 argument is floored at ``EXP_FLOOR`` (expm1 is -1 there in float32 and float64 alike); the
    Taylor branch is skipped on the CPU when no gene is near-equal."""
    small = gap < _NEAR_EQUAL
    safe = torch.where(small, torch.ones_like(gap), gap)
    em = torch.expm1((t * -gap).clamp_min_(EXP_FLOOR))
    ratio = em / -safe
    if t.device.type != "cpu" or bool(small.any()):
        ratio = torch.where(small, _taylor_ratio(gap, t), ratio)
    return ratio, em, small, safe


def exp_diff(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(exp(-a t) - exp(-b t)) / (b - a)``, finite and exact as ``a -> b`` (limit ``t exp(-a t)``).

    The original divides by ``gamma - beta + 1e-6``, which is wrong near ``gamma = beta`` and infinite at
    ``gamma - beta = -1e-6``; ``expm1`` with an explicit Taylor expansion for near-equal rates avoids both.
    The expression is symmetric in ``a, b``; it is evaluated as ``exp(-low t) (1 - exp(-gap t)) / gap`` with
    the smaller rate and the gap ``|b - a|``, so that no exponential grows (``exp(-a t) expm1((a - b) t)``
    overflows to ``inf`` for ``(a - b) t > 88`` in float32, and gives NaN where ``exp(-a t)`` underflows).
    """
    low, gap, _ = _low_and_gap(a, b)
    if _expm1_only(gap):
        # inference with per-gene rates, none near-equal: the expm1 branch alone (the same values;
        # 6 instead of 12 passes over t's (samples, cells, genes))
        return torch.exp(-low * t).mul_(torch.expm1(-gap * t).div_(-gap))
    return torch.exp(-low * t) * _gap_ratio(gap, t)[0]


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
    s = s0 * torch.exp(-gamma * tau) + beta * u0 * exp_diff(gamma, beta, tau)
    return u, s


def transcription_rate(
    alpha: torch.Tensor, t: torch.Tensor, alpha_1: torch.Tensor | None, lambda_alpha: torch.Tensor | None
) -> torch.Tensor:
    """``alpha(t)`` during induction: constant ``alpha``, or rising from ``alpha`` to ``alpha_1``."""
    if alpha_1 is None:
        return alpha.expand_as(t)
    return alpha_1 - (alpha_1 - alpha) * torch.exp(-lambda_alpha * t)


class _SwitchKinetics(torch.autograd.Function):
    """Induction and repression abundances at the decoded positions, with a hand-written gradient.

    Inputs: ``rho, tau`` ``(..., G)``; per-gene ``alpha, beta, gamma`` and switch time ``t_s`` ``(G,)``; ``t_max``.
    Outputs: ``t_ind = rho t_s``, ``tau_rep = (t_max - t_s) tau``, ``u_ind, s_ind`` (:func:`induction` at
    ``t_ind``), ``u_rep, s_rep`` (:func:`repression` for ``tau_rep`` from the switch abundances) and
    ``u_switch, s_switch`` (:func:`induction` at ``t_s``); the same values as those functions, to float
    rounding. Constant transcription rate only.

    The three times are rows of one ``(2 n + 1, G)`` array (``n`` cells of ``t_ind``, ``n`` of ``tau_rep``,
    then ``t_s``), so each exponential is one pass; the gradient comes from the ODE in time
    (``du/dt = alpha - beta u``, ``ds/dt = beta u - gamma s``) and closed-form derivatives in the rates,
    summed over the rows in one reduction. About 80 array operations per training step where autograd's
    graph of :func:`induction` and :func:`repression` runs about 420.
    """

    @staticmethod
    def forward(ctx, rho, tau, alpha, beta, gamma, t_s, t_max: float):
        ctx.set_materialize_grads(False)
        g = rho.shape[-1]
        n = rho.numel() // g
        t_ind, tau_rep = rho * t_s, (t_max - t_s) * tau
        times = torch.cat([t_ind.reshape(n, g), tau_rep.reshape(n, g), t_s.reshape(1, g)])
        _, gap, beta_larger = _low_and_gap(gamma, beta)
        # exp and expm1 of the same products: 1 + expm1 would lose the relative accuracy of small
        # exponentials, which D = exp(-gamma t) (1 - exp(-d t)) / d multiplies by large ratios
        # (floored at EXP_FLOOR: exp takes a slow path below float32's normal range, where the terms are
        # negligible; expm1 is -1 there either way)
        bt, gt = (times * -beta).clamp_min_(EXP_FLOOR), (times * -gamma).clamp_min_(EXP_FLOOR)
        e_b, e_g = torch.exp(bt), torch.exp(gt)
        u1 = torch.expm1(bt).div_(-beta)  # (1 - exp(-beta t)) / beta = u / alpha
        ug = torch.expm1(gt).div_(-gamma)
        ratio, em_d, small, safe = _gap_ratio(gap, times)  # (1 - exp(-gap t)) / gap
        e_low = torch.where(beta_larger, e_g, e_b)
        big_d = e_low * ratio  # exp_diff(gamma, beta, t), as there
        s1 = ug - big_d  # s / alpha
        u, s = alpha * u1, alpha * s1
        u_sw, s_sw = u[-1], s[-1]
        # repression rows: from the switch abundances
        e_b_r, e_g_r, d_r = e_b[n:-1], e_g[n:-1], big_d[n:-1]
        u_rep = u_sw * e_b_r
        s_rep = torch.addcmul(s_sw * e_g_r, beta * u_sw, d_r)
        shape = rho.shape
        outputs = (t_ind, tau_rep, u[:n].view(shape), s[:n].view(shape), u_rep.view(shape), s_rep.view(shape))
        outputs = (*outputs, u_sw, s_sw)
        ctx.save_for_backward(
            *(rho, tau, alpha, beta, gamma, t_s, times, e_b, em_d, e_g, e_low, ratio, big_d, u1, ug, s1),
            *(u, s, u_rep, s_rep),
        )
        ctx.small, ctx.safe, ctx.gap, ctx.beta_larger = small, safe, gap, beta_larger
        ctx.n, ctx.t_max = n, t_max
        return outputs

    @staticmethod
    @once_differentiable  # first derivatives only: a second backward raises
    def backward(ctx, g_t, g_tau, g_ui, g_si, g_ur, g_sr, g_usw, g_ssw):
        (rho, tau, alpha, beta, gamma, t_s, times, e_b, em_d, e_g, e_low, ratio, big_d, u1, ug, s1) = (
            ctx.saved_tensors[:16]
        )
        u, s, u_rep, s_rep = ctx.saved_tensors[16:]  # (2n+1, G) and the repression outputs
        n, g = ctx.n, times.shape[-1]
        small, safe, gap = ctx.small, ctx.safe, ctx.gap
        # D = exp(-low t) F(gap) with F = (1 - exp(-gap t)) / gap; dF/dgap = (t exp(-gap t) - F) / gap, or the
        # Taylor derivative. dD/d(larger rate) = exp(-low t) F'; dD/d(smaller rate) = -t D - exp(-low t) F'
        f_d = (times * (em_d + 1) - ratio) / safe
        if times.device.type != "cpu" or bool(small.any()):
            f_d = torch.where(small, times * times * (gap * times / 3 - 0.5), f_d)
        egf = e_low * f_d
        minus_td = times * -big_d
        dd_beta = torch.where(ctx.beta_larger, egf, minus_td - egf)
        dd_gamma = minus_td - dd_beta  # dD/dbeta + dD/dgamma = -t D

        def rows(x):
            return None if x is None else x.reshape(n, g)

        g_ui, g_si, g_ur, g_sr = rows(g_ui), rows(g_si), rows(g_ur), rows(g_sr)
        u_sw, s_sw = u[-1], s[-1]
        u_rep, s_rep = u_rep.reshape(n, g), s_rep.reshape(n, g)
        bu = beta * u_sw
        # repression rows (n:2n): dt, dbeta, dgamma, and what flows back to the switch abundances
        tr, e_b_r, e_g_r, d_r = times[n:-1], e_b[n:-1], e_g[n:-1], big_d[n:-1]
        zero = torch.zeros((), dtype=times.dtype, device=times.device)
        p_t_r = p_b_r = p_g_r = zero
        to_u_sw, to_s_sw = g_usw, g_ssw
        if g_ur is not None:
            p_t_r = -g_ur * (beta * u_rep)
            p_b_r = -g_ur * (tr * u_rep)
            to_u_sw = _total([to_u_sw, (g_ur * e_b_r).sum(0)])
        if g_sr is not None:
            p_t_r = p_t_r + g_sr * (beta * u_rep - gamma * s_rep)
            p_b_r = p_b_r + g_sr * (u_sw * d_r + bu * dd_beta[n:-1])
            p_g_r = g_sr * (bu * dd_gamma[n:-1] - tr * s_sw * e_g_r)
            to_u_sw = _total([to_u_sw, (g_sr * d_r).sum(0) * beta])
            to_s_sw = _total([to_s_sw, (g_sr * e_g_r).sum(0)])
        # induction rows (0:n) and the switch row (2n): gradients of u and s, zero on the repression rows
        g_u = torch.zeros_like(times)
        g_s = torch.zeros_like(times)
        for grad, dest in ((g_ui, g_u[:n]), (g_si, g_s[:n]), (to_u_sw, g_u[-1]), (to_s_sw, g_s[-1])):
            if grad is not None:
                dest.copy_(grad)
        p_t = g_u * e_b * alpha + g_s * (beta * u - gamma * s)
        p_a = g_u * u1 + g_s * s1
        g_sa = g_s * alpha
        p_b = g_u * (times * e_b - u1) * (alpha / beta) - g_sa * dd_beta
        p_g = g_sa * ((times * e_g - ug) / gamma - dd_gamma)
        p_t[n:-1] += p_t_r
        if g_t is not None:  # the times are outputs too
            p_t[:n] += g_t.reshape(n, g)
        if g_tau is not None:
            p_t[n:-1] += g_tau.reshape(n, g)
        p_b[n:-1] += p_b_r
        p_g[n:-1] += p_g_r
        # d times / d t_s per row: rho (induction), -tau (repression), 1 (switch)
        dts = torch.cat([rho.reshape(n, g), -tau.reshape(n, g), torch.ones_like(t_s).reshape(1, g)])
        per_gene = torch.stack([p_a, p_b, p_g, p_t * dts]).sum(1)
        shape = rho.shape
        grads = (
            (p_t[:n] * t_s).view(shape),
            (p_t[n:-1] * (ctx.t_max - t_s)).view(shape),
            *per_gene.unbind(0),
        )
        return (*(x if need else None for x, need in zip(grads, ctx.needs_input_grad)), None)


def _total(values):
    """Sum of the tensors in ``values`` that are not ``None`` (``None`` if all are)."""
    out = None
    for v in values:
        if v is not None:
            out = v if out is None else out + v
    return out


def switch_kinetics(rho, tau, alpha, beta, gamma, t_s, t_max: float) -> tuple[torch.Tensor, ...]:
    """``(t_ind, tau_rep, u_ind, s_ind, u_rep, s_rep, u_switch, s_switch)`` for a constant transcription rate
    (:class:`_SwitchKinetics`): ``t_ind = rho t_s``, ``tau_rep = (t_max - t_s) tau``, :func:`induction` at
    ``t_ind`` and at ``t_s``, and :func:`repression` for ``tau_rep`` from the abundances at ``t_s``."""
    return _SwitchKinetics.apply(rho, tau, alpha, beta, gamma, t_s, float(t_max))
