"""The veloVI generative model in torch: switching-ODE kinetics decoded from a cell latent space.

Knows nothing of AnnData. Every method takes a leading sample dimension: ``inference(n_samples=S)`` gives
``z`` of shape ``(S, B, n_latent)`` (``(B, n_latent)`` for ``S == 1``) and everything downstream keeps it,
so posterior samples are drawn in one batched pass.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module._constants import MODULE_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import Encoder, FCLayers
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributions import Normal

from ._constants import VELOVI_REGISTRY_KEYS
from ._kinetics import exp_diff, induction, repression, switch_kinetics, transcription_rate
from ._special import exp_floored_, lgamma_digamma, lgamma_digamma_trigamma

_LOG_2PI = math.log(2 * math.pi)
_TINY = float(torch.finfo(torch.float32).eps)
_SMALLEST = float(torch.finfo(torch.float32).tiny)  # keeps log(uniform) finite


def log_gamma_rsample(concentration: torch.Tensor) -> torch.Tensor:
    """Logarithm of exact Gamma(concentration, 1) samples, reparameterised by shape augmentation.

    Marsaglia-Tsang for shape ``a + 1`` (acceptance > 95%; the accepted normal draw is the noise), times
    ``U ** (1 / a)``; gradients flow through both (Naesseth et al., AISTATS 2017, with the small rejection
    correction dropped). Much cheaper than ``torch.distributions.Dirichlet.rsample``'s implicit gradient, and
    in log space, so small concentrations do not underflow to probabilities of exactly 0.

    Two uniform draws per entry are saved: the boost ``U`` reuses the acceptance test's uniform. Given
    that ``u`` was accepted, ``log u < h(eps)``, ``u / min(1, exp(h(eps)))`` is uniform on ``(0, 1)`` and
    independent of ``eps``, so the samples are still exact. The first round runs on whole tensors; only the
    few rejected entries are redrawn.

    Without a gradient to carry (inference, or a concentration that does not require grad) the draws come
    from :func:`log_gamma_sample`: the same sampler in fewer, cache-sized passes.
    """
    if not (concentration.requires_grad and torch.is_grad_enabled()):
        return log_gamma_sample(concentration)
    d = concentration + (1.0 - 1.0 / 3.0)  # shape a + 1, minus 1/3
    c = torch.rsqrt(9.0 * d)
    eps, log_boost = _noise_and_boost(d.detach(), c.detach())
    return torch.log(d) + 3 * torch.log1p(c * eps) + log_boost / concentration


def _noise_and_boost(d0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted Marsaglia-Tsang noise ``eps`` and log boost per entry (whole tensors; rejected redrawn)."""
    with torch.no_grad():
        eps = torch.randn_like(d0)
        log_boost, ok = _marsaglia_tsang(d0, c0, eps, _log_uniform(d0))
        if not bool(ok.all()):
            eps, log_boost = eps.reshape(-1), log_boost.reshape(-1)
            todo = torch.nonzero(~ok.reshape(-1)).squeeze(-1)
            flat_d, flat_c = d0.reshape(-1), c0.reshape(-1)
            for _ in range(_REDRAW_ROUNDS):  # the rejected entries (a few percent), several trials each
                if todo.numel() == 0:
                    break
                dd = flat_d[todo].repeat(_CANDIDATES)
                e = torch.randn_like(dd)
                lb, ok_t = _marsaglia_tsang(dd, flat_c[todo].repeat(_CANDIDATES), e, _log_uniform(dd))
                got, (e, lb) = _first_accepted(ok_t, e, lb)
                eps[todo[got]], log_boost[todo[got]] = e[got], lb[got]
                todo = todo[~got]
            eps, log_boost = eps.view_as(d0), log_boost.view_as(d0)
    return eps, log_boost


#: Trials per rejected entry and round of the torch rejection samplers' redraws (the first accepted one is
#: kept: the same law as one trial per round; the NumPy draws take one). At acceptance >= 95%, all 3 fail
#: with probability < 1.3e-4, so one round nearly always finishes (each round costs about 20 array
#: operations) at 15% more trials than the first pass had entries; 1 trial took 3-5 rounds, 8 trials cost
#: more than they saved.
_CANDIDATES = 3
#: Rounds of torch redraws before an entry that is never accepted (a NaN shape) is left as it is.
_REDRAW_ROUNDS = 32


def _first_accepted(ok: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Of :data:`_CANDIDATES` trials per entry, laid out trial-major (``(trials * m,)``, as ``repeat`` gives):
    whether one was accepted (``(m,)``) and, for each of ``values``, the first accepted trial's value per
    entry (the first trial's where none was)."""
    ok = ok.reshape(_CANDIDATES, -1)
    pick = ok.to(torch.uint8).argmax(0, keepdim=True)
    return ok.gather(0, pick)[0], [v.reshape(_CANDIDATES, -1).gather(0, pick)[0] for v in values]


#: Elements per pass of the gradient-free samplers: their dozen temporaries of this size stay in a core's
#: L2 cache (one (3, 50, 128, 50) draw of induction/repression probabilities: 1.9x faster than one pass).
_SAMPLE_CHUNK = 1 << 17

#: Rows (samples x cells) per block of the decoder at inference: a block's (rows, n_hidden) activations
#: stay in a core's L2 cache between the layers.
_DECODE_ROWS = 1024


@torch.no_grad()
def log_gamma_sample(concentration: torch.Tensor) -> torch.Tensor:
    """Log of exact Gamma(concentration, 1) samples without a gradient (the law of :func:`log_gamma_rsample`).

    The same Marsaglia-Tsang draw with the recycled uniform boost, with ``log w^3`` computed once for the
    acceptance test and the sample, over the flattened tensor in chunks of :data:`_SAMPLE_CHUNK` elements;
    the rejected entries of all chunks are redrawn together at the end (:func:`_redraw_rejected`).

    Training's validation steps draw through here: it stays on torch's generator and ops (the NumPy draws
    of :class:`_NumpyGammaSampler` would change the random stream, hence the training trajectory).
    """
    a = concentration.reshape(-1)
    out = torch.empty_like(a)
    rejected = []
    for start in range(0, a.numel(), _SAMPLE_CHUNK):
        ok = _log_gamma_try(a[start : start + _SAMPLE_CHUNK], out[start : start + _SAMPLE_CHUNK])
        rejected.append(torch.nonzero(ok.logical_not_()).squeeze(-1).add_(start))
    _redraw_rejected(a, out, torch.cat(rejected))
    return out.view(concentration.shape)


#: Draw the gradient-free induction/repression probabilities on the CPU with :class:`_NumpyGammaSampler`
#: (float32 tensors): the sampled velocities of ``get_velocity(return_mean=False)`` and
#: ``get_directional_uncertainty``. The same law as the torch draws but another random stream, so for one
#: seed these outputs differ from a GPU or float64 run (and from cellvi before this sampler); set
#: ``cellvi.velovi._module._NUMPY_SAMPLER = False`` for torch's stream. Training does not use it.
_NUMPY_SAMPLER = True


def _use_numpy_sampler(concentration: torch.Tensor) -> bool:
    return _NUMPY_SAMPLER and concentration.device.type == "cpu" and concentration.dtype == torch.float32


class _NumpyGammaSampler:
    """The gradient-free Marsaglia-Tsang draws of :func:`_log_gamma_try` in NumPy, for float32 on the CPU.

    The same law (test, recycled uniform boost, log space), drawn from a NumPy ``SFC64`` generator seeded
    from torch's default generator (so ``torch.manual_seed`` still fixes the draws): its raw 64-bit words
    give two 24-bit uniforms each, one for the acceptance test and boost, one for a Box-Muller normal (the
    24-bit uniforms of torch's own ``rand``/``randn``). On one core (AMD EPYC, AVX-512), torch's CPU
    ``rand``/``randn`` (MT19937) cost about 3-4 ns per value and its ``log`` about 1.1 ns; NumPy's raw
    words about 1.9 ns per pair of values and its SIMD ``log``, ``sin`` and ``cos`` about 0.5 ns. The
    induction/repression draw of one 128-cell minibatch (3 x 50 x 128 x 50 Gammas, the concentrations of
    a 1000 x 50 model trained 200 epochs) took 17.1 ms with the torch ops and 10.0 ms here (CPU time, min
    of 40 alternating calls of ``_induction_repression_sample`` with ``_NUMPY_SAMPLER`` off and on).
    """

    def __init__(self) -> None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.bits = np.random.SFC64(seed)

    def _try(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """One trial per entry of 1-D float32 ``a``: its log-Gamma value into ``out``; the acceptance mask."""
        with np.errstate(all="ignore"):  # log of w^3 <= 0 and NaN shapes: rejected, no warning
            return self._try_unchecked(a, out)

    def _try_unchecked(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        n = a.size
        half = (n + 1) // 2
        # uint32 halves of the raw words: n acceptance uniforms, then the radius and angle uniforms
        bits = self.bits.random_raw((n + 1) // 2 + half).view(np.uint32)
        u = np.right_shift(bits, 8, out=bits).astype(np.float32)
        u *= _INV_2_24
        u += _HALF_2_24  # (k + 1/2) / 2**24: in (0, 1] (float32 rounds the top half to a 2**-23 grid)
        log_u = np.log(u[:n])
        radius = np.log(u[n : n + half])
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle = u[n + half : n + 2 * half]
        angle *= _TWO_PI
        eps = np.empty(2 * half, dtype=np.float32)  # Box-Muller: both coordinates of each pair
        np.cos(angle, out=eps[:half])
        np.sin(angle, out=eps[half:])
        eps[:half] *= radius
        eps[half:] *= radius
        eps = eps[:n]
        d = a + np.float32(1.0 - 1.0 / 3.0)
        w = np.multiply(d, np.float32(9.0))
        np.sqrt(w, out=w)
        np.divide(eps, w, out=w)
        w += 1.0  # 1 + c eps
        w3 = np.multiply(w, w)
        w3 *= w
        log_w3 = np.log(w3)  # NaN or -inf for w <= 0: rejected below
        h = np.add(log_w3, 1.0)
        h -= w3
        h *= d
        eps *= eps
        eps *= 0.5
        h += eps
        ok = log_u < h
        # log x = log d + log w^3 + (log u - min(h, 0)) / a
        np.minimum(h, 0.0, out=h)
        log_u -= h
        log_u /= a
        log_u += log_w3
        np.log(d, out=d)
        np.add(log_u, d, out=out)
        return ok

    def _redraw(self, a: np.ndarray, out: np.ndarray, todo: np.ndarray) -> None:
        """Redraw the entries ``todo`` of ``out`` until accepted, all chunks' together (:func:`_redraw_rejected`
        with this generator's trials)."""
        _redraw_rejected(a, out, todo, self._trial)

    def _trial(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        value = np.empty(a.size, dtype=np.float32)
        return value, self._try(a, value)

    def induction_repression(self, concentration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_induction_repression_sample`: the three shapes ``(a_0, a_2, a_1 + a_3)`` of each chunk laid
        out as a ``(3, m)`` block and drawn while in cache, the rejected redrawn, each chunk normalised in
        log space."""
        a = concentration.detach().reshape(-1, 4).numpy()
        n = a.shape[0]
        step = max(1, _SAMPLE_CHUNK // 3)
        shapes = np.empty(3 * n, dtype=np.float32)
        log_g = np.empty_like(shapes)
        p = np.empty((2, n), dtype=np.float32)
        with np.errstate(all="ignore"):
            rejected = _fill_and_try(
                a, shapes, log_g, step, np.add, lambda x, out: np.flatnonzero(~self._try(x, out))
            )
            self._redraw(shapes, log_g, np.concatenate(rejected))
            for start in range(0, n, step):
                m = min(step, n - start)
                e = log_g[3 * start : 3 * (start + m)].reshape(3, m)
                e -= e.max(0)
                np.exp(e, out=e)  # normalised in log space: no 0 / 0 at small shapes
                total = e.sum(0)
                np.divide(e[0], total, out=p[0, start : start + m])
                np.divide(e[1], total, out=p[1, start : start + m])
        shape = concentration.shape[:-1]
        return torch.from_numpy(p[0]).view(shape), torch.from_numpy(p[1]).view(shape)


_INV_2_24 = np.float32(2.0**-24)
_HALF_2_24 = np.float32(2.0**-25)
_TWO_PI = np.float32(2.0 * math.pi)


def _log_gamma_try(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One Marsaglia-Tsang trial per entry of 1-D ``a`` (no autograd): its log-Gamma value into ``out``;
    returns the acceptance mask (NaN or -inf ``log w^3``, i.e. ``w <= 0``, is rejected)."""
    d = a + (1.0 - 1.0 / 3.0)
    eps = torch.randn_like(d)
    w = torch.rsqrt(d * 9.0).mul_(eps).add_(1.0)  # 1 + c eps
    w3 = torch.mul(w, w).mul_(w)
    log_w3 = torch.log(w3)
    h = torch.add(log_w3, 1.0).sub_(w3).mul_(d).addcmul_(eps, eps, value=0.5)
    log_u = _log_uniform(d)
    ok = log_u < h
    # log x = log d + log w^3 + (log u - min(h, 0)) / a
    torch.add(log_u.sub_(h.clamp_max_(0.0)).div_(a).add_(log_w3), d.log_(), out=out)
    return ok


def _redraw_rejected(a, out, todo, trial=None, rounds: int | None = None) -> None:
    """Redraw the entries ``todo`` of 1-D ``out`` (shapes ``a``) until accepted; entries still rejected after
    ``rounds`` rounds (default: about 96 trials per entry), such as NaN shapes, keep their value, as in
    :func:`log_gamma_rsample`. One call for all chunks. Torch tensors or NumPy arrays alike:
    ``trial(shapes)`` returns one draw per entry and the acceptance mask (default: :func:`_log_gamma_try` on
    torch's generator). Torch draws :data:`_CANDIDATES` trials per entry and round and keeps the first
    accepted (fewer rounds of about 20 operations each); NumPy, whose operations cost little per call,
    draws one (no surplus trials over the millions of draws of the posterior summaries)."""
    trial = trial or _torch_trial
    numpy = isinstance(out, np.ndarray)
    k = 1 if numpy else _CANDIDATES
    for _ in range(_REDRAW_ROUNDS * _CANDIDATES // k if rounds is None else rounds):
        if len(todo) == 0:
            return
        shapes = a[todo]
        if k == 1:
            value, ok = trial(shapes)
        else:
            value, ok = trial(shapes.repeat(k))
            ok, (value,) = _first_accepted(ok, value)
        out[todo[ok]] = value[ok]
        todo = todo[~ok]


def _torch_trial(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    value = torch.empty_like(a)
    return value, _log_gamma_try(a, value)


def _log_uniform(like: torch.Tensor) -> torch.Tensor:
    """``log U`` with ``U ~ Uniform(0, 1)`` shaped like ``like`` (finite: ``U`` is at least float32's tiny)."""
    return torch.rand_like(like).clamp_min_(_SMALLEST).log_()


def _marsaglia_tsang(
    d: torch.Tensor, c: torch.Tensor, eps: torch.Tensor, log_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Acceptance of ``d (1 + c eps)^3`` as a Gamma(d + 1/3) draw, and the recycled log-uniform boost.

    Test ``log u < h = eps^2 / 2 + d (1 + log w^3 - w^3)``, ``w = 1 + c eps`` (``w <= 0`` gives ``h = NaN``:
    rejected). The boost is ``log u - min(h, 0)``. In-place arithmetic on temporaries (no autograd here).
    """
    w = torch.mul(c, eps).add_(1)
    w3 = torch.mul(w, w).mul_(w)
    h = torch.log(w).mul_(3).add_(1).sub_(w3).mul_(d).addcmul_(eps, eps, value=0.5)
    ok = log_u < h
    return log_u.sub_(h.clamp_max_(0)), ok


def gamma_rsample(concentration: torch.Tensor) -> torch.Tensor:
    """Exact Gamma(concentration, 1) samples, reparameterised (see :func:`log_gamma_rsample`)."""
    return torch.exp(log_gamma_rsample(concentration))


def dirichlet_log_rsample(concentration: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Log of a reparameterised Dirichlet sample along ``dim`` (normalised Gamma draws)."""
    if concentration.requires_grad and torch.is_grad_enabled():
        return _DirichletLogRsample.apply(concentration, dim)
    log_x = log_gamma_sample(concentration)
    return log_x - torch.logsumexp(log_x, dim=dim, keepdim=True)


class _DirichletLogRsample(torch.autograd.Function):
    """:func:`log_gamma_rsample` normalised along ``dim`` in log space, with a hand-written gradient.

    The same draws as ``log_x - logsumexp(log_x)`` with ``log_x = log_gamma_rsample(a)``, and its values to
    float rounding (``log(w)`` here, ``log1p(c eps)`` there);
    ``d log_x / d a = 1 / d - 1.5 c eps / (d w) - log_boost / a^2`` (``d = a + 2/3``, ``c = (9 d)^(-1/2)``,
    ``w = 1 + c eps``) is formed in the forward pass, and the backward pass is the softmax's: about 40
    array operations fewer per training step than autograd's graph of the same expressions.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, dim: int):
        d = a + (1.0 - 1.0 / 3.0)
        c = torch.rsqrt(d * 9.0)
        eps, log_boost = _noise_and_boost(d, c)
        c_eps = c.mul_(eps)
        w = c_eps + 1.0
        boost = log_boost.div_(a)
        log_x = torch.log(w).mul_(3.0).add_(torch.log(d)).add_(boost)
        out = log_x.sub_(torch.logsumexp(log_x, dim=dim, keepdim=True))
        factor = c_eps.div_(w).mul_(-1.5).add_(1.0).div_(d).sub_(boost.div_(a))
        ctx.save_for_backward(out, factor)
        ctx.dim = dim
        return out

    @staticmethod
    @once_differentiable  # first derivatives only: a second backward raises
    def backward(ctx, grad: torch.Tensor):
        out, factor = ctx.saved_tensors
        g_log_x = grad - out.exp() * grad.sum(ctx.dim, keepdim=True)
        return g_log_x.mul_(factor), None


def induction_repression_rsample(concentration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws of ``(pi_0, pi_2)`` for ``pi ~ Dir(concentration)`` over 4 states (last dimension).

    By the Dirichlet's aggregation property, ``(pi_0, pi_2, pi_1 + pi_3) ~ Dir(a_0, a_2, a_1 + a_3)``: the
    same joint law from three Gamma draws instead of four (for quantities that read only the induction and
    repression probabilities, such as the expected velocity).
    """
    a = concentration
    if not (a.requires_grad and torch.is_grad_enabled()):
        return _induction_repression_sample(a)
    three = torch.stack([a[..., 0], a[..., 2], a[..., 1] + a[..., 3]])
    p = dirichlet_log_rsample(three, dim=0)[:2].exp()  # not in place: the draw's backward reads it
    return p[0], p[1]


@torch.no_grad()
def _fill_and_try(a, shapes, log_g, step: int, add, try_block) -> list:
    """Lay the three Gamma shapes ``(a_0, a_2, a_1 + a_3)`` of every chunk of ``step`` rows of ``a``
    ``(n, 4)`` out as a ``(3, m)`` block of the flat ``shapes`` and draw it while in cache: ``try_block(x,
    out)`` (one trial per entry, returns the indices rejected) writes its log draws into ``log_g``. Works on
    NumPy arrays (``add=np.add``) and torch tensors (``add=torch.add``); returns the rejected indices of
    every chunk (in ``shapes``)."""
    rejected = []
    for start in range(0, a.shape[0], step):
        c = a[start : start + step]
        block = slice(3 * start, 3 * start + 3 * c.shape[0])
        three = shapes[block].reshape(3, -1)
        three[0], three[1] = c[:, 0], c[:, 2]
        add(c[:, 1], c[:, 3], out=three[2])
        rejected.append(try_block(shapes[block], log_g[block]) + 3 * start)
    return rejected


def _induction_repression_sample(concentration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`induction_repression_rsample` without a gradient, in cache-sized chunks of cells and genes.

    The three Gamma shapes and log draws are laid out chunk by chunk (each chunk a ``(3, m)`` block), the
    rejected entries of all chunks are redrawn together, then each chunk is normalised in log space. On
    the CPU in float32 the draws run in NumPy (:meth:`_NumpyGammaSampler.induction_repression`).
    """
    if _use_numpy_sampler(concentration):
        return _NumpyGammaSampler().induction_repression(concentration)
    a = concentration.reshape(-1, 4)
    n = a.shape[0]
    shapes = torch.empty(3 * n, dtype=a.dtype, device=a.device)
    log_g = torch.empty_like(shapes)
    step = max(1, _SAMPLE_CHUNK // 3)
    rejected = _fill_and_try(
        a,
        shapes,
        log_g,
        step,
        torch.add,
        lambda x, out: torch.nonzero(_log_gamma_try(x, out).logical_not_())[:, 0],
    )
    _redraw_rejected(shapes, log_g, torch.cat(rejected))
    p_ind, p_rep = torch.empty((2, n), dtype=a.dtype, device=a.device)
    for start in range(0, n, step):
        m = min(step, n - start)
        lg = log_g[3 * start : 3 * (start + m)].view(3, m)
        e = exp_floored_(lg.sub_(lg.amax(0)))  # normalised in log space: no 0 / 0 at small shapes
        total = e.sum(0)
        torch.div(e[0], total, out=p_ind[start : start + m])
        torch.div(e[1], total, out=p_rep[start : start + m])
    shape = concentration.shape[:-1]
    return p_ind.view(shape), p_rep.view(shape)


class _MixtureLogLik(torch.autograd.Function):
    """``log sum_k pi_k N(x; mu_k, sd_k^2)`` of unspliced and spliced, with a hand-written gradient.

    Inputs: ``log_pi`` ``(..., G, 4)``; the state means ``u_ind, u_rep, s_ind, s_rep`` ``(..., G)``, the
    steady states ``u_ss, s_ss`` (broadcastable to them) and 0 for the repression steady state;
    ``sd`` ``(2, G, 4)``; observed ``u, s`` ``(B, G)``. Returns ``(2, ..., G)`` (unspliced, spliced).

    The same values as ``logsumexp(log_pi + log N, -1)`` on stacked ``(2, ..., G, 4)`` means, computed
    with the four states as a leading dimension: PyTorch's CPU kernels reduce and broadcast over a
    trailing dimension of size 4 about ten times slower than over a leading one, and autograd's
    graph of this expression is about a dozen nodes over ``(2, ..., G, 4)`` tensors. The gradient is
    ``r_k = softmax_k(...)`` times ``1`` (``log_pi``), ``(x - mu_k) / sd_k^2`` (means) and
    ``((x - mu_k)^2 / sd_k^2 - 1) / sd_k`` (``sd``).
    """

    @staticmethod
    def forward(ctx, log_pi, u_ind, u_rep, s_ind, s_rep, u_ss, s_ss, sd, u_obs, s_obs, states_first=False):
        pi_shape = log_pi.shape[1:] if states_first else log_pi.shape[:-1]
        shapes = (u_ind.shape, u_rep.shape, s_ind.shape, s_rep.shape, pi_shape)
        # torch.broadcast_shapes is Python (about 0.1 ms a call): only when the shapes differ
        shape = shapes[0] if all(x == shapes[0] for x in shapes) else torch.broadcast_shapes(*shapes)
        zero = u_ind.new_zeros(()).expand(shape)
        parts = [u_ind, s_ind, u_ss, s_ss, u_rep, s_rep, zero, zero]
        means = torch.stack([p.expand(shape) for p in parts]).view(4, 2, *shape)  # states outermost
        one = (1,) * (len(shape) - 1)
        sd_sf = sd.permute(2, 0, 1).reshape(4, 2, *one, shape[-1])
        inv = math.sqrt(0.5) / sd_sf
        x = torch.stack([u_obs.expand(shape[-2:]), s_obs.expand(shape[-2:])]).view(
            1, 2, *one[1:], *shape[-2:]
        )
        zsc = (x - means).mul_(inv)
        lp = (log_pi if states_first else log_pi.movedim(-1, 0).contiguous()).unsqueeze(1)  # (4, 1, ...)
        a = (lp - (torch.log(sd_sf) + 0.5 * _LOG_2PI)).addcmul_(zsc, zsc, value=-1.0)
        m = a.amax(0)
        e = exp_floored_(a.sub_(m))
        total = e.sum(0)
        ll = torch.log(total).add_(m)
        ctx.save_for_backward(e.div_(total), zsc, inv, sd_sf)
        ctx.shapes = [t.shape for t in (log_pi, u_ind, u_rep, s_ind, s_rep, u_ss, s_ss, sd, u_obs, s_obs)]
        ctx.states_first = states_first
        return ll

    @staticmethod
    @once_differentiable  # first derivatives only: a second backward raises
    def backward(ctx, grad):
        r, zsc, inv, sd_sf = ctx.saved_tensors
        shapes = ctx.shapes
        need = ctx.needs_input_grad
        gr = r * grad  # (4, 2, ...)
        gz = gr * zsc
        g_means = gz * (2.0 * inv)
        out = [None] * 11
        if need[0]:
            g_pi = torch.add(gr[:, 0], gr[:, 1])
            out[0] = (g_pi if ctx.states_first else g_pi.movedim(0, -1)).sum_to_size(shapes[0])
        for i, (state, row) in zip((1, 2, 3, 4, 5, 6), ((0, 0), (2, 0), (0, 1), (2, 1), (1, 0), (1, 1))):
            if need[i]:
                out[i] = g_means[state, row].sum_to_size(shapes[i])
        if need[7]:
            g_sd = (gz.mul_(zsc).mul_(2.0).sub_(gr)).div_(sd_sf)
            g_sd = g_sd.flatten(2, -2).sum(2)  # (4, 2, G)
            out[7] = g_sd.permute(1, 2, 0).sum_to_size(shapes[7])
        if need[8] or need[9]:
            g_x = -g_means.sum(0)  # (2, ..., B, G)
            out[8], out[9] = g_x[0].sum_to_size(shapes[8]), g_x[1].sum_to_size(shapes[9])
        return tuple(out)


def mixture_log_likelihood(log_pi, kinetics, sd, unspliced, spliced, states_first=False) -> torch.Tensor:
    """Per cell-gene ``(log p(u), log p(s))`` stacked ``(2, ..., G)``: see :class:`_MixtureLogLik`.

    ``log_pi`` is ``(..., G, 4)``, or ``(4, ..., G)`` with ``states_first=True``.
    """
    k = kinetics
    return _MixtureLogLik.apply(
        log_pi,
        k["u_ind"],
        k["u_rep"],
        k["s_ind"],
        k["s_rep"],
        k["u_steady"],
        k["s_steady"],
        sd,
        unspliced,
        spliced,
        states_first,
    )


class _KLDirichlet(torch.autograd.Function):
    """``KL(Dir(a) || Dir(b 1))`` over dimension ``dim`` with a hand-written gradient.

    ``dKL/da_j = (a_j - b) psi'(a_j) - (a_0 - K b) psi'(a_0)``, formed in the forward pass with
    trigamma from the terms that ``lgamma`` and ``digamma`` share
    (:func:`~cellvi.velovi._special.lgamma_digamma_trigamma`: vectorised, where PyTorch's CPU ``digamma``
    is a scalar loop); the backward pass is one product. Without a gradient to form (validation), trigamma
    is skipped.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, prior: float, dim: int = -1):
        k = a.shape[dim]
        a0 = a.sum(dim)
        grad = ctx.needs_input_grad[0]
        # the special functions of a and a0 in one call, trigamma (for the gradient) from the same terms
        special = _special_of_both(lgamma_digamma_trigamma if grad else lgamma_digamma, a, a0)
        (lg_a, lg_a0), (dig_a, dig_a0) = special[:2]
        excess = a - prior
        out = (
            lg_a0
            - lg_a.sum(dim)
            + (k * math.lgamma(prior) - math.lgamma(prior * k))
            + dig_a.sub_(dig_a0.unsqueeze(dim)).mul_(excess).sum(dim)  # in place on the special's outputs
        )
        if grad:  # dKL/da, formed here: the backward pass is one product
            tri_a, tri_a0 = special[2]
            ctx.save_for_backward(tri_a.mul_(excess).sub_(((a0 - k * prior) * tri_a0).unsqueeze(dim)))
        ctx.dim = dim
        return out

    @staticmethod
    @once_differentiable  # first derivatives only: a second backward raises
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(ctx.dim), None, None


def _special_of_both(fn, a: torch.Tensor, a0: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``fn`` (returning a tuple of elementwise results) of ``a`` and ``a0`` in one call on their concatenation
    (each of these special functions is some thirty array operations): for each result, its values at ``a``
    and at ``a0``."""
    both = torch.cat([a.reshape(-1), a0.reshape(-1)])
    return [(r[: a.numel()].view(a.shape), r[a.numel() :].view(a0.shape)) for r in fn(both) if r is not None]


def kl_dirichlet(concentration: torch.Tensor, prior: float, dim: int = -1) -> torch.Tensor:
    """``KL(Dir(concentration) || Dir(prior * 1))`` along dimension ``dim``."""
    return _KLDirichlet.apply(concentration, float(prior), dim)


def _dirichlet_log_density(log_p: torch.Tensor, concentration: torch.Tensor) -> torch.Tensor:
    """Dirichlet log-density at ``exp(log_p)`` from the log-probabilities (no underflow at small ``p``)."""
    return (
        ((concentration - 1) * log_p).sum(-1)
        + torch.lgamma(concentration.sum(-1))
        - torch.lgamma(concentration).sum(-1)
    )


def _flat_apply(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D network to ``x`` of shape ``(..., d)``, keeping the leading dims."""
    lead = x.shape[:-1]
    out = fn(x.reshape(-1, x.shape[-1]))
    return out.reshape(*lead, out.shape[-1])


def _fold_fc(fc: FCLayers) -> list[tuple]:
    """The layers of ``fc`` (eval mode, no covariates) folded into fewer passes, for :func:`_apply_folded`.

    Each ``Linear`` followed by ``BatchNorm1d`` becomes one affine map (running statistics folded into the
    weights). A following ``LayerNorm`` without affine parameters centres each row, which is linear: the
    centring is folded into the weights too (rows of the weight and the bias minus their means over the
    output units), leaving one scale per row, ``1 / sqrt(mean(x^2) + eps)``, applied after the ReLU (it
    is positive). The same function to float rounding, with two passes over the ``(cells, n_hidden)``
    activations (norm, scale with ReLU) instead of four (batch norm, layer norm, ReLU). Each entry is
    ``(weight, bias, layer_norm_eps or None, relu, remaining layers)``, or ``(layers,)`` for a layer
    that is not folded.
    """
    steps = []
    for layers in fc.fc_layers:
        linear, bn, *rest = layers
        if not isinstance(linear, nn.Linear) or (
            bn is not None and not (isinstance(bn, nn.BatchNorm1d) and bn.running_var is not None)
        ):
            steps.append((layers,))
            continue
        weight, bias = linear.weight, linear.bias
        if bn is not None:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            bias = shift if bias is None else torch.addcmul(shift, bias, scale)
            weight = weight * scale.unsqueeze(1)
        ln, relu = rest[0] if rest else None, False
        if isinstance(ln, nn.LayerNorm) and ln.weight is None and len(ln.normalized_shape) == 1:
            rest = rest[1:]
            weight = weight - weight.mean(0)
            bias = None if bias is None else bias - bias.mean()
            relu = bool(rest) and type(rest[0]) is nn.ReLU
            rest = rest[1:] if relu else rest
            steps.append((weight, bias, ln.eps, relu, rest))
        else:
            steps.append((weight, bias, None, False, rest))
    return steps


def _apply_folded(steps: list[tuple], x: torch.Tensor) -> torch.Tensor:
    """Run 2-D ``x`` through the layers folded by :func:`_fold_fc`."""
    for step in steps:
        if len(step) == 1:
            x = step[0](x)
            continue
        weight, bias, ln_eps, relu, rest = step
        x = F.linear(x, weight, bias)  # rows centred when ln_eps is set
        if ln_eps is not None:
            inv_sd = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            inv_sd = inv_sd.square_().div_(x.shape[-1]).add_(ln_eps).rsqrt_()
            if relu:
                x.relu_()
            x.mul_(inv_sd)
        for layer in rest:
            if layer is not None:
                x = layer(x)
    return x


class _MaskDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with the mask drawn by one ``rand`` and a compare.

    The same distribution and scaling; PyTorch's CPU ``bernoulli_`` costs about twice as much as the
    ``rand`` it replaces (per training step, as much as the encoder's matrix product). No parameters, so
    state dicts are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep


def _use_mask_dropout(module: nn.Module) -> None:
    """Swap every :class:`torch.nn.Dropout` under ``module`` for :class:`_MaskDropout` (same ``p``)."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, _MaskDropout(child.p))
        else:
            _use_mask_dropout(child)


class DecoderVELOVI(nn.Module):
    """Decode the latent space into per-gene state probabilities and positions along the trajectory.

    Parameters
    ----------
    n_input
        The dimensionality of the input (latent space).
    n_output
        The dimensionality of the output (number of genes).
    n_layers
        The number of fully-connected hidden layers.
    n_hidden
        The number of nodes per hidden layer.
    dropout_rate
        Dropout rate to apply to each of the hidden layers.
    use_batch_norm
        Whether to use batch norm in layers.
    use_layer_norm
        Whether to use layer norm in layers.
    linear_decoder
        Whether to use a linear decoder from the latent space to time (``rho`` and ``tau`` become tied,
        anti-monotone functions of one linear score per gene).
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.0,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        linear_decoder: bool = False,
    ):
        super().__init__()
        self.n_output = n_output
        self.linear_decoder = linear_decoder
        if linear_decoder:
            self.rho_first_decoder = FCLayers(
                n_in=n_input,
                n_out=n_output,
                n_layers=1,
                dropout_rate=0.0,
                use_batch_norm=True,
                use_layer_norm=False,
                use_activation=False,
                bias=False,
            )
            self.linear_scaling_tau = nn.Parameter(torch.zeros(n_output))
            self.linear_scaling_tau_intercept = nn.Parameter(torch.zeros(n_output))
        else:
            self.rho_first_decoder = FCLayers(
                n_in=n_input,
                n_out=n_hidden,
                n_layers=n_layers,
                n_hidden=n_hidden,
                dropout_rate=dropout_rate,
                use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
            )
            self.px_rho_decoder = nn.Linear(n_hidden, n_output)
            self.px_tau_decoder = nn.Linear(n_hidden, n_output)
        self.pi_first_decoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
        )
        self.px_pi_decoder = nn.Linear(n_hidden, 4 * n_output)

    def forward(self, z: torch.Tensor, latent_dim: int | None = None):
        """Dirichlet concentrations ``(..., G, 4)``, ``rho`` and ``tau`` ``(..., G)`` from ``z`` ``(..., L)``.

        ``latent_dim`` keeps only that latent dimension for the ``rho``/``tau`` branch (the state
        probabilities still see all of ``z``). In eval mode without autograd, see :meth:`_forward_rows`.
        """
        if not self.training and not torch.is_grad_enabled():
            return self._forward_rows(z, latent_dim)
        z_rho = z
        if latent_dim is not None:
            mask = torch.zeros_like(z)
            mask[..., latent_dim] = 1
            z_rho = z * mask
        rho_first = _flat_apply(self.rho_first_decoder, z_rho)
        if self.linear_decoder:
            px_rho = torch.sigmoid(rho_first)
            px_tau = 1 - torch.sigmoid(
                rho_first * self.linear_scaling_tau.exp() + self.linear_scaling_tau_intercept
            )
        else:
            px_rho = torch.sigmoid(self.px_rho_decoder(rho_first))
            px_tau = torch.sigmoid(self.px_tau_decoder(rho_first))
        pi_first = _flat_apply(self.pi_first_decoder, z)
        px_pi = F.softplus(self.px_pi_decoder(pi_first))
        px_pi = px_pi.reshape(*px_pi.shape[:-1], self.n_output, 4)
        return px_pi, px_rho, px_tau

    def _forward_rows(self, z: torch.Tensor, latent_dim: int | None = None):
        """:meth:`forward` at inference: blocks of :data:`_DECODE_ROWS` rows of ``z`` (samples x cells), each
        through both branches while its hidden activations are still in cache, into preallocated outputs;
        the ``rho`` and ``tau`` heads as one matrix product and one sigmoid. The same outputs."""
        lead, g = z.shape[:-1], self.n_output
        rows = z.reshape(-1, z.shape[-1])
        rows_rho = rows
        if latent_dim is not None:
            mask = torch.zeros_like(rows[:1])
            mask[..., latent_dim] = 1
            rows_rho = rows * mask
        n = rows.shape[0]
        px_pi = torch.empty((n, 4 * g), dtype=z.dtype, device=z.device)
        rho_tau = torch.empty((n, 2 * g), dtype=z.dtype, device=z.device)
        if self.linear_decoder:
            tau_scale = self.linear_scaling_tau.exp()
        else:
            weight = torch.cat([self.px_rho_decoder.weight, self.px_tau_decoder.weight])
            bias = torch.cat([self.px_rho_decoder.bias, self.px_tau_decoder.bias])
        # the decoders' weights folded once for all blocks (or their own forward with covariates)
        rho_net, pi_net = (
            fc if any(k > 1 for k in fc.n_cat_list) else partial(_apply_folded, _fold_fc(fc))
            for fc in (self.rho_first_decoder, self.pi_first_decoder)
        )
        for start in range(0, n, _DECODE_ROWS):
            block = slice(start, start + _DECODE_ROWS)
            rho_first = rho_net(rows_rho[block])
            if self.linear_decoder:
                rho_tau[block, :g] = torch.sigmoid(rho_first)
                tau = rho_first * tau_scale + self.linear_scaling_tau_intercept
                rho_tau[block, g:] = 1 - torch.sigmoid(tau)
            else:
                torch.sigmoid(F.linear(rho_first, weight, bias), out=rho_tau[block])
            pi_first = pi_net(rows[block])
            px_pi[block] = F.softplus(self.px_pi_decoder(pi_first))
        rho_tau = rho_tau.view(*lead, 2 * g)
        return px_pi.view(*lead, g, 4), rho_tau[..., :g], rho_tau[..., g:]


def _velocities_of(k: dict[str, torch.Tensor], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction and repression velocities (``ds/dt`` for ``'spliced'``, else ``du/dt``) from the kinetics."""
    beta, gamma = k["beta"], k["gamma"]
    if mode == "spliced":
        return beta * k["u_ind"] - gamma * k["s_ind"], beta * k["u_rep"] - gamma * k["s_rep"]
    return k["alpha_t"] - beta * k["u_ind"], -beta * k["u_rep"]


class VELOVAE(BaseModuleClass):
    """Variational auto-encoder of spliced and unspliced abundances with switching-ODE kinetics.

    Parameters
    ----------
    n_input
        Number of genes.
    true_time_switch
        Not used; kept out on purpose (the original ignores it). Switch times are always learnt.
    n_hidden
        Number of nodes per hidden layer.
    n_latent
        Dimensionality of the latent space.
    n_layers
        Number of hidden layers used for encoder and decoder NNs.
    dropout_rate
        Dropout rate for the encoder.
    log_variational
        Log(data+0.01) prior to encoding for numerical stability. Not normalization.
    latent_distribution
        Only ``'normal'`` (isotropic normal) is supported.
    use_batch_norm
        Where to use batch norm: ``'none'``, ``'encoder'``, ``'decoder'`` or ``'both'``.
    use_layer_norm
        Where to use layer norm: ``'none'``, ``'encoder'``, ``'decoder'`` or ``'both'``.
    var_activation
        Callable used to ensure positivity of the variational distributions' variance (default: softplus).
    t_max
        Largest latent time (the switch time is clamped to ``[0, t_max]``).
    penalty_scale
        Scale of the penalty pulling each gene's state at the switch time to its initial estimate.
    dirichlet_concentration
        Concentration of the symmetric Dirichlet prior on the state probabilities.
    linear_decoder
        Use a linear decoder from latent space to time.
    time_dep_transcription_rate
        Let the transcription rate rise in time from ``alpha`` to ``alpha_1`` at rate ``lambda_alpha``.
    switch_spliced, switch_unspliced
        Per-gene spliced/unspliced abundance expected at the switch time (targets of the penalty).
    gamma_unconstr_init, alpha_unconstr_init, alpha_1_unconstr_init, lambda_alpha_unconstr_init
        Initial values of the unconstrained rates (softplus-inverse), per gene; ``None`` for the defaults.
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        log_variational: bool = False,
        latent_distribution: str = "normal",
        use_batch_norm: str = "both",
        use_layer_norm: str = "both",
        var_activation=None,
        t_max: float = 20.0,
        penalty_scale: float = 0.2,
        dirichlet_concentration: float = 0.25,
        linear_decoder: bool = False,
        time_dep_transcription_rate: bool = False,
        switch_spliced: np.ndarray | None = None,
        switch_unspliced: np.ndarray | None = None,
        gamma_unconstr_init: np.ndarray | None = None,
        alpha_unconstr_init: np.ndarray | None = None,
        alpha_1_unconstr_init: np.ndarray | None = None,
        lambda_alpha_unconstr_init: np.ndarray | None = None,
    ):
        super().__init__()
        if latent_distribution != "normal":
            raise ValueError(f"latent_distribution must be 'normal', got {latent_distribution!r}.")
        for arg, value in (("use_batch_norm", use_batch_norm), ("use_layer_norm", use_layer_norm)):
            if value not in ("none", "encoder", "decoder", "both"):
                raise ValueError(f"{arg} must be one of 'none', 'encoder', 'decoder', 'both'; got {value!r}.")
        self.n_input = n_input
        self.n_latent = n_latent
        self.log_variational = log_variational
        self.latent_distribution = latent_distribution
        self.t_max = float(t_max)
        self.penalty_scale = penalty_scale
        self.dirichlet_concentration = dirichlet_concentration
        self.time_dep_transcription_rate = time_dep_transcription_rate

        def as_param(init, default):
            value = np.full(n_input, default, dtype=np.float32) if init is None else np.asarray(init)
            return torch.as_tensor(value.astype(np.float32).ravel())

        self.gamma_mean_unconstr = nn.Parameter(as_param(gamma_unconstr_init, -1.0))
        self.beta_mean_unconstr = nn.Parameter(as_param(None, 0.5))
        self.alpha_unconstr = nn.Parameter(as_param(alpha_unconstr_init, 0.0))
        self.switch_time_unconstr = nn.Parameter(7 + 0.5 * torch.randn(n_input))
        # per-gene log-variance (through softplus) of unspliced (row 0) and spliced (row 1)
        self.scale_unconstr = nn.Parameter(-1 * torch.ones(2, n_input))
        if time_dep_transcription_rate:
            self.alpha_1_unconstr = nn.Parameter(as_param(alpha_1_unconstr_init, 0.0))
            self.lambda_alpha_unconstr = nn.Parameter(as_param(lambda_alpha_unconstr_init, 0.0))
        else:
            self.alpha_1_unconstr = None
            self.lambda_alpha_unconstr = None
        self.register_buffer("switch_spliced", as_param(switch_spliced, 0.0))
        self.register_buffer("switch_unspliced", as_param(switch_unspliced, 0.0))

        use_bn_enc = use_batch_norm in ("encoder", "both")
        use_bn_dec = use_batch_norm in ("decoder", "both")
        use_ln_enc = use_layer_norm in ("encoder", "both")
        use_ln_dec = use_layer_norm in ("decoder", "both")
        self.z_encoder = Encoder(
            2 * n_input,
            n_latent,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            distribution=latent_distribution,
            use_batch_norm=use_bn_enc,
            use_layer_norm=use_ln_enc,
            var_activation=torch.nn.Softplus() if var_activation is None else var_activation,
            activation_fn=torch.nn.ReLU,
        )
        self.decoder = DecoderVELOVI(
            n_latent,
            n_input,
            n_layers=n_layers,
            n_hidden=n_hidden,
            use_batch_norm=use_bn_dec,
            use_layer_norm=use_ln_dec,
            linear_decoder=linear_decoder,
        )
        _use_mask_dropout(self)

    # ------------------------------------------------------------------ rates and kinetics
    def get_rates(self) -> dict[str, torch.Tensor]:
        """Constrained per-gene rates ``gamma, beta, alpha, alpha_1, lambda_alpha`` (``alpha_1 = alpha``,
        ``lambda_alpha = 0`` without time-dependent transcription)."""
        params = [self.gamma_mean_unconstr, self.beta_mean_unconstr, self.alpha_unconstr]
        if self.time_dep_transcription_rate:
            params += [self.alpha_1_unconstr, self.lambda_alpha_unconstr]
        # clamp(softplus(x), 0, 50) of every rate in one pass (softplus is >= 0: the lower clamp is a no-op)
        rates = F.softplus(torch.stack(params)).clamp_max_(50).unbind(0)
        gamma, beta, alpha = rates[:3]
        if self.time_dep_transcription_rate:
            alpha_1, lambda_alpha = rates[3:]
        else:
            alpha_1, lambda_alpha = alpha, torch.zeros_like(alpha)
        return {
            "gamma": gamma,
            "beta": beta,
            "alpha": alpha,
            "alpha_1": alpha_1,
            "lambda_alpha": lambda_alpha,
        }

    def switch_time(self) -> torch.Tensor:
        """Per-gene switch time, ``clamp(softplus(t~), 0, t_max)`` (the same everywhere it is used)."""
        return F.softplus(self.switch_time_unconstr).clamp_max(self.t_max)  # softplus >= 0

    def get_loadings(self) -> np.ndarray:
        """Linear decoder loadings ``(n_genes, n_latent)``, batch norm folded in (``linear_decoder=True``)."""
        if not self.decoder.linear_decoder:
            raise ValueError("get_loadings needs linear_decoder=True.")
        linear, bn = (
            self.decoder.rho_first_decoder.fc_layers[0][0],
            self.decoder.rho_first_decoder.fc_layers[0][1],
        )
        w = linear.weight
        if bn is not None:
            w = torch.diag(bn.weight / torch.sqrt(bn.running_var + bn.eps)) @ w
        return w.detach().cpu().numpy()

    def kinetics(self, px_rho: torch.Tensor, px_tau: torch.Tensor) -> dict[str, torch.Tensor]:
        """Abundances, times and velocities of the four states at the decoded trajectory positions."""
        r = self.get_rates()
        gamma, beta, alpha = r["gamma"], r["beta"], r["alpha"]
        time_dep = self.time_dep_transcription_rate
        a1, lam = (r["alpha_1"], r["lambda_alpha"]) if time_dep else (None, None)
        t_s = self.switch_time()
        if (
            torch.is_grad_enabled()
            and not time_dep
            and px_rho.shape == px_tau.shape
            and px_rho.shape[-1] == t_s.shape[-1]
        ):
            # training: one node with a hand-written gradient (the same values)
            t_ind, tau_rep, u_ind, s_ind, u_rep, s_rep, u_sw, s_sw = switch_kinetics(
                px_rho, px_tau, alpha, beta, gamma, t_s, self.t_max
            )
        else:
            t_ind = px_rho * t_s
            u_ind, s_ind = induction(alpha, beta, gamma, t_ind, a1, lam)
            tau_rep, u_sw, s_sw, u_rep, s_rep = self._repression_branch(r, t_s, px_tau, a1, lam)
        alpha_ss = r["alpha_1"] if time_dep else alpha
        return {
            "t_s": t_s,
            "t_ind": t_ind,
            "t_rep": t_s + tau_rep,
            "u_ind": u_ind,
            "s_ind": s_ind,
            "u_rep": u_rep,
            "s_rep": s_rep,
            "u_switch": u_sw,
            "s_switch": s_sw,
            "u_steady": alpha_ss / beta,
            "s_steady": alpha_ss / gamma,
            "alpha_t": transcription_rate(alpha, t_ind, a1, lam),
            **r,
        }

    def _repression_branch(
        self, r: dict[str, torch.Tensor], t_s: torch.Tensor, px_tau: torch.Tensor, a1=None, lam=None
    ):
        """Time into repression ``tau (t_max - t_s)``, the abundances at the switch ``t_s`` and in repression."""
        alpha, beta, gamma = r["alpha"], r["beta"], r["gamma"]
        tau_rep = (self.t_max - t_s) * px_tau
        u_sw, s_sw = induction(alpha, beta, gamma, t_s, a1, lam)
        u_rep, s_rep = repression(u_sw, s_sw, beta, gamma, tau_rep)
        return tau_rep, u_sw, s_sw, u_rep, s_rep

    def state_means(self, k: dict[str, torch.Tensor]) -> torch.Tensor:
        """Means ``(2, ..., G, 4)`` of unspliced (index 0) and spliced (index 1) in the four states."""
        zero = torch.zeros_like(k["u_ind"])
        u_ss, s_ss = k["u_steady"].expand_as(zero), k["s_steady"].expand_as(zero)
        means = torch.stack([k["u_ind"], u_ss, k["u_rep"], zero, k["s_ind"], s_ss, k["s_rep"], zero], dim=-1)
        return means.unflatten(-1, (2, 4)).movedim(-2, 0)

    def state_scales(self) -> torch.Tensor:
        """Standard deviations ``(2, G, 4)`` of unspliced and spliced; the repression steady state is 10x tighter."""
        sd = torch.sqrt(F.softplus(self.scale_unconstr))
        return sd.unsqueeze(-1) * sd.new_tensor([1.0, 1.0, 1.0, 0.1])

    # ------------------------------------------------------------------ scvi-tools module interface
    def _get_inference_input(self, tensors, **kwargs):
        return {
            "spliced": tensors[VELOVI_REGISTRY_KEYS.X_KEY],
            "unspliced": tensors[VELOVI_REGISTRY_KEYS.U_KEY],
        }

    def _get_generative_input(self, tensors, inference_outputs, **kwargs):
        return {"z": inference_outputs[MODULE_KEYS.Z_KEY]}

    @auto_move_data
    def inference(self, spliced, unspliced, n_samples: int = 1):
        """Encode ``[spliced, unspliced]``; draw ``n_samples`` latent samples in one go."""
        return self._inference(spliced, unspliced, n_samples)

    def _inference(self, spliced, unspliced, n_samples: int = 1):
        """:meth:`inference` for tensors already on the module's device (no per-call device lookup)."""
        if self.log_variational:
            spliced, unspliced = torch.log(0.01 + spliced), torch.log(0.01 + unspliced)
        qz_m, qz_v, z = self.z_encoder(torch.cat((spliced, unspliced), dim=-1))
        qz = Normal(qz_m, qz_v.sqrt(), validate_args=False)
        if n_samples > 1:
            z = qz.rsample((n_samples,))
        return {
            MODULE_KEYS.Z_KEY: z,
            MODULE_KEYS.QZM_KEY: qz_m,
            MODULE_KEYS.QZV_KEY: qz_v,
            MODULE_KEYS.QZ_KEY: qz,
        }

    @auto_move_data
    def generative(self, z, latent_dim: int | None = None, sample_pi: bool = True):
        """Decode ``z`` into state probabilities and the state kinetics.

        The state probabilities are rsampled from their Dirichlet, or with ``sample_pi=False`` set to its
        mean ``E[pi | z]`` (for posterior means of quantities linear in ``pi``: same expectation, no noise).
        """
        return self._generative(z, latent_dim, sample_pi)

    def _generative(
        self, z, latent_dim: int | None = None, sample_pi: bool | str = True, log_pi: bool = True
    ):
        """:meth:`generative` for tensors already on the module's device (no per-call device lookup).

        ``sample_pi='induction_repression'`` draws only the induction and repression probabilities
        (:func:`induction_repression_rsample`, exact): ``pi_states`` is then ``(pi_0, None, pi_2, None)``
        and ``px_pi`` / ``log_px_pi`` / ``kinetics`` are absent, for the expected velocity. ``log_pi=False`` leaves out
        ``log_px_pi`` / ``log_pi_states`` (for posterior summaries): with ``sample_pi=False`` the mean
        state probabilities are then ``alpha / sum(alpha)`` directly, without logarithms.
        """
        px_pi_alpha, px_rho, px_tau = self.decoder(z, latent_dim=latent_dim)
        if sample_pi == "induction_repression":
            p_ind, p_rep = induction_repression_rsample(px_pi_alpha)
            # no kinetics dict: velocity() computes the two state velocities it needs from rho and tau
            return {
                "px_pi_alpha": px_pi_alpha,
                "pi_states": (p_ind, None, p_rep, None),
                "px_rho": px_rho,
                "px_tau": px_tau,
            }
        # the state dimension goes first for the computations (one copy): PyTorch's CPU kernels reduce
        # and broadcast over a trailing dimension of size 4 about ten times slower than over a leading one
        alpha_states = px_pi_alpha.movedim(-1, 0).contiguous()
        if sample_pi:
            log_pi_states = dirichlet_log_rsample(alpha_states, dim=0)
            pi_states = torch.exp(log_pi_states)
        elif log_pi:
            log_pi_states = torch.log(alpha_states) - torch.log(alpha_states.sum(0))
            pi_states = torch.exp(log_pi_states)
        else:
            pi_states = alpha_states / alpha_states.sum(0)
        k = self.kinetics(px_rho, px_tau)
        u_sw, s_sw = k["u_switch"], k["s_switch"]
        end_penalty = ((u_sw - self.switch_unspliced) ** 2).sum() + ((s_sw - self.switch_spliced) ** 2).sum()
        if log_pi:
            logs = {"log_px_pi": log_pi_states.movedim(0, -1), "log_pi_states": log_pi_states}
        else:
            logs = {}
        return {
            "px_pi": pi_states.movedim(0, -1),
            **logs,
            "px_pi_alpha": px_pi_alpha,
            "pi_states": pi_states,  # (4, ..., G): the same values with the states first
            "alpha_states": alpha_states,
            "px_rho": px_rho,
            "px_tau": px_tau,
            "kinetics": k,
            "end_penalty": end_penalty,
        }

    def log_likelihood(
        self, spliced: torch.Tensor, unspliced: torch.Tensor, generative_outputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cell-gene ``log p(u)`` and ``log p(s)``: Gaussian mixtures over the four states sharing ``pi``.

        The state is marginalised separately for ``u`` and ``s`` (as in veloVI). Both mixtures are evaluated
        in one stacked pass with a hand-written gradient (:class:`_MixtureLogLik`).
        """
        ll = mixture_log_likelihood(
            generative_outputs["log_pi_states"],
            generative_outputs["kinetics"],
            self.state_scales(),
            unspliced,
            spliced,
            states_first=True,
        )
        return ll[0], ll[1]

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        """Negative ELBO per cell (mean over the batch) plus the fading switch penalty."""
        spliced = tensors[VELOVI_REGISTRY_KEYS.X_KEY]
        unspliced = tensors[VELOVI_REGISTRY_KEYS.U_KEY]
        qz_m, qz_v = inference_outputs[MODULE_KEYS.QZM_KEY], inference_outputs[MODULE_KEYS.QZV_KEY]

        log_pu, log_ps = self.log_likelihood(spliced, unspliced, generative_outputs)
        reconst_loss = -(log_pu.sum(-1) + log_ps.sum(-1))
        kl_z = 0.5 * (qz_m * qz_m + qz_v - torch.log(qz_v) - 1).sum(dim=-1)
        kl_pi = kl_dirichlet(generative_outputs["alpha_states"], self.dirichlet_concentration, dim=0).sum(
            dim=-1
        )
        loss = torch.mean(reconst_loss + kl_weight * kl_z + kl_pi)
        loss = loss + self.penalty_scale * (1 - kl_weight) * generative_outputs["end_penalty"]
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst_loss,
            kl_local={"kl_divergence_z": kl_z, "kl_divergence_pi": kl_pi},
        )

    # ------------------------------------------------------------------ posterior summaries
    def latent_time(self, generative_outputs: dict, statistic: str = "mean") -> torch.Tensor:
        """Per cell-gene time: expected over states (``'mean'``) or of the most probable state (``'max'``).

        Induction is at ``rho * t_s``, its steady state at ``t_s``, repression at ``t_s + tau (t_max - t_s)``
        and the repression steady state at ``t_max`` (the original puts it at 0, collapsing cells that
        finished repression onto the start of the trajectory).
        """
        k = generative_outputs["kinetics"]
        t_ind = k["t_ind"]
        times = [t_ind, k["t_s"].expand_as(t_ind), k["t_rep"], torch.full_like(t_ind, self.t_max)]
        return self._reduce_states(times, generative_outputs["pi_states"], statistic)

    def velocity(
        self, generative_outputs: dict, mode: str = "spliced", statistic: str = "mean"
    ) -> torch.Tensor:
        """Per cell-gene ``ds/dt`` (``mode='spliced'``) or ``du/dt``, expected over states or of the MAP state.

        Without a ``kinetics`` entry (``sample_pi='induction_repression'``) the induction and repression
        velocities come from :meth:`state_velocities`.
        """
        if "kinetics" in generative_outputs:
            v_ind, v_rep = _velocities_of(generative_outputs["kinetics"], mode)
        else:
            v_ind, v_rep = self.state_velocities(
                generative_outputs["px_rho"], generative_outputs["px_tau"], mode
            )
        return self._reduce_states([v_ind, None, v_rep, None], generative_outputs["pi_states"], statistic)

    def state_velocities(
        self, px_rho: torch.Tensor, px_tau: torch.Tensor, mode: str = "spliced"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities in induction and repression at the decoded positions (the steady states have 0).

        With constant transcription, the spliced induction velocity is taken in closed form,
        ``beta u - gamma s = alpha beta (exp(-gamma t) - exp(-beta t)) / (beta - gamma)``
        (:func:`~cellvi.velovi._kinetics.exp_diff`; the same value, without the cancellation of the
        difference and with a third of the array operations); otherwise from :meth:`kinetics`.
        """
        if mode != "spliced" or self.time_dep_transcription_rate:
            return _velocities_of(self.kinetics(px_rho, px_tau), mode)
        r = self.get_rates()
        alpha, beta, gamma = r["alpha"], r["beta"], r["gamma"]
        t_s = self.switch_time()
        v_ind = exp_diff(gamma, beta, px_rho * t_s) * (alpha * beta)
        _, _, _, u_rep, s_rep = self._repression_branch(r, t_s, px_tau)
        return v_ind, beta * u_rep - gamma * s_rep

    def expression_fit(self, generative_outputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixture means ``sum_k pi_k mu_k`` of spliced and unspliced (the repression steady state is 0)."""
        k, pi = generative_outputs["kinetics"], generative_outputs["pi_states"]
        fit_s = self._reduce_states([k["s_ind"], k["s_steady"], k["s_rep"], None], pi, "mean")
        fit_u = self._reduce_states([k["u_ind"], k["u_steady"], k["u_rep"], None], pi, "mean")
        return fit_s, fit_u

    @staticmethod
    def _reduce_states(values: list, pi: torch.Tensor, statistic: str) -> torch.Tensor:
        """``sum_k pi_k v_k`` (``'mean'``) or ``v`` of the most probable state (``'max'``).

        ``values`` holds the four states' values (broadcastable to ``pi[0]``; ``None`` for 0), ``pi`` is
        ``(4, ...)`` (states first); for ``'mean'`` it may also be a sequence of four with ``None`` where
        the value is ``None`` (see ``sample_pi='induction_repression'``).
        """
        if statistic == "mean":
            out = None
            for p, v in zip(pi, values, strict=True):
                if v is not None:
                    out = p * v if out is None else out.addcmul(p, v)
            return out
        full = [torch.zeros_like(pi[0]) if v is None else v.expand_as(pi[0]) for v in values]
        return torch.gather(torch.stack(full), 0, pi.argmax(0, keepdim=True)).squeeze(0)

    # ------------------------------------------------------------------ marginal likelihood and sampling
    @torch.inference_mode()
    def marginal_ll(
        self,
        tensors: dict[str, torch.Tensor],
        n_mc_samples: int,
        return_mean: bool = False,
        n_mc_samples_per_pass: int = 100,
    ):
        """Importance-sampled ``log p(u, s)`` per cell, with proposal ``q(z | u, s) q(pi | z)``.

        The state probabilities ``pi`` are latent variables with prior ``Dir(dirichlet_concentration)``;
        both ``z`` and ``pi`` are importance sampled.
        """
        inp = self._get_inference_input(tensors)
        spliced, unspliced = inp["spliced"].to(self.device), inp["unspliced"].to(self.device)
        log_w = []
        remaining = n_mc_samples
        while remaining > 0:
            n = min(remaining, n_mc_samples_per_pass)
            remaining -= n
            inf = self.inference(spliced, unspliced, n_samples=n)
            z = inf[MODULE_KEYS.Z_KEY]
            if n == 1:
                z = z.unsqueeze(0)
            gen = self.generative(z)
            log_pi = gen["log_px_pi"]
            log_pu, log_ps = self.log_likelihood(spliced, unspliced, gen)
            conc = gen["px_pi_alpha"]
            prior_pi = _dirichlet_log_density(log_pi, torch.full_like(conc, self.dirichlet_concentration))
            q_pi = _dirichlet_log_density(log_pi, conc)
            log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_qz = inf[MODULE_KEYS.QZ_KEY].log_prob(z).sum(-1)
            log_w.append(log_pu.sum(-1) + log_ps.sum(-1) + (prior_pi - q_pi).sum(-1) + log_pz - log_qz)
        log_w = torch.cat(log_w, dim=0)
        ll = torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)
        return ll.mean().item() if return_mean else ll

    @torch.inference_mode()
    def sample(
        self, tensors: dict[str, torch.Tensor], n_samples: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(spliced, unspliced)`` from the posterior predictive; shape ``(n_samples, B, G)``."""
        inp = self._get_inference_input(tensors)
        inf = self.inference(inp["spliced"], inp["unspliced"], n_samples=n_samples)
        z = inf[MODULE_KEYS.Z_KEY]
        if n_samples == 1:
            z = z.unsqueeze(0)
        gen = self.generative(z)
        mean_u, mean_s = self.state_means(gen["kinetics"])
        sd_u, sd_s = self.state_scales()
        states = torch.distributions.Categorical(probs=gen["px_pi"])

        def draw(mean, sd):  # u and s draw their states separately, as the likelihood marginalises them
            state = states.sample().unsqueeze(-1)
            m = torch.gather(mean, -1, state).squeeze(-1)
            s = torch.gather(sd.expand_as(mean), -1, state).squeeze(-1)
            return m + s * torch.randn_like(m)

        return draw(mean_s, sd_s), draw(mean_u, sd_u)
