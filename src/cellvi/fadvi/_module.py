"""FADVAE: the torch model behind :class:`cellvi.FADVI` (knows nothing of AnnData)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module._constants import MODULE_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import DecoderSCVI, Encoder, FCLayers
from torch import nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as kl

from .._validation import check_number
from ._constants import BLOCKS


class _DualHead(torch.autograd.Function):
    """A head (Linear, LayerNorm without affine, ReLU, Linear) computed once, with two outputs of the same
    value: gradients of the first reach the parameters only (``head(z.detach())``), those of the second
    ``z`` only (``head.frozen(z)``). Backward: both upstream gradients through the output layer in one
    matmul, the ReLU mask, the layer-norm backward ``rstd (g - mean(g) - y mean(g y))``, then the
    parameter gradients from the first and the input gradient from the second.
    """

    @staticmethod
    def forward(ctx, z, w1, b1, w2, b2, eps):
        a = F.linear(z, w1, b1)
        y, _, rstd = torch.native_layer_norm(a, (a.shape[-1],), None, None, eps)
        h = F.relu(y)
        out = F.linear(h, w2, b2)
        ctx.save_for_backward(z, w1, w2, y, h, rstd)
        return out, out.clone()

    @staticmethod
    def backward(ctx, g_params, g_input):
        z, w1, w2, y, h, rstd = ctx.saved_tensors
        n = z.shape[0]
        if g_params is None:
            g_params = torch.zeros_like(h[:, : w2.shape[0]])
        if g_input is None:
            g_input = torch.zeros_like(g_params)
        g_w2 = g_params.T @ h
        g_b2 = g_params.sum(0)
        gh = torch.cat([g_params, g_input]) @ w2  # (2n, H)
        gy = gh.view(2, n, -1).mul_(h > 0)
        ga = (gy - gy.mean(-1, keepdim=True) - y * (gy * y).mean(-1, keepdim=True)).mul_(rstd)
        g_w1 = ga[0].T @ z
        g_b1 = ga[0].sum(0)
        g_z = ga[1] @ w1 if ctx.needs_input_grad[0] else None
        return g_z, g_w1, g_b1, g_w2, g_b2, None


class _Head(nn.Module):
    """Classifier head: one hidden layer (LayerNorm, ReLU, dropout), then logits.

    LayerNorm rather than BatchNorm, so a head behaves the same for one cell or many and can be
    called twice per step (as the adversaries are) without touching running statistics.
    """

    def __init__(self, n_input: int, n_output: int, n_hidden: int, dropout_rate: float):
        super().__init__()
        self.net = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_layers=1,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=False,
            use_layer_norm=True,
        )
        self.out = nn.Linear(n_hidden, n_output)

    def _run(self, z: torch.Tensor, frozen: bool) -> torch.Tensor:
        # the ops of ``self.out(self.net(z))`` (FCLayers without covariates: Linear, LayerNorm
        # without affine, ReLU, Dropout) called directly: FCLayers' generic forward and, for the
        # frozen call, ``torch.func.functional_call`` (which swaps every parameter in and out of
        # the module) cost more per step than the head's arithmetic
        lin, _, norm, _, drop = self.net.fc_layers[0]
        w, b, w_out, b_out = lin.weight, lin.bias, self.out.weight, self.out.bias
        if frozen:
            w, b, w_out, b_out = w.detach(), b.detach(), w_out.detach(), b_out.detach()
        h = F.relu(F.layer_norm(F.linear(z, w, b), norm.normalized_shape, None, None, norm.eps))
        if drop is not None:
            h = F.dropout(h, drop.p, drop.training)
        return F.linear(h, w_out, b_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(z, frozen=False)

    def frozen(self, z: torch.Tensor) -> torch.Tensor:
        """The head on ``z`` with its parameters detached: gradients reach ``z`` only."""
        return self._run(z, frozen=True)

    def dual(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(z.detach()), self.frozen(z))``, computed once (:class:`_DualHead`; no dropout)."""
        lin, _, norm, _, drop = self.net.fc_layers[0]
        if drop is not None and drop.p > 0 and drop.training:
            return self(z.detach()), self.frozen(z)
        return _DualHead.apply(z, lin.weight, lin.bias, self.out.weight, self.out.bias, norm.eps)


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the cells in ``mask`` (0 when the mask is empty)."""
    if mask is not None:
        logits, target = logits[mask], target[mask]
    if target.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target)


def _uniform_gap(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the predicted class distribution to the uniform one, minus ``log C`` (>= 0).

    Zero exactly when the prediction carries no information; bounded below, unlike maximising
    the adversary's cross-entropy.
    """
    if mask is not None:
        logits = logits[mask]
    if logits.shape[0] == 0 or logits.shape[-1] < 2:
        return logits.sum() * 0.0
    return (-F.log_softmax(logits, dim=-1).mean(-1)).mean() - math.log(logits.shape[-1])


def _kl_unit_normal(loc: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(N(loc, scale) || N(mean, 1))`` per entry (``mean`` 0 when None): torch's Normal-Normal formula
    with the unit scale divided out, without building (and validating) the distribution objects."""
    var = scale.pow(2)
    t1 = (loc if mean is None else loc - mean).pow(2)
    return 0.5 * (var + t1 - 1 - var.log())


def _standardise(z: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Centre and scale every column over the minibatch (as a fresh probe would)."""
    if z.shape[0] < 2:
        return z - z.detach()
    return (z - z.mean(0, keepdim=True)) / z.std(0, keepdim=True).clamp(min=eps)


def _group_means(onehot: torch.Tensor, z: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``z`` in each group (columns of ``onehot``, sizes ``counts``; empty: 0)."""
    return (onehot.transpose(-1, -2) @ z) / counts.clamp(min=1).unsqueeze(-1)


def _group_whiten(
    z: torch.Tensor, onehot: torch.Tensor, ridge: float = 1e-2, dims: torch.Tensor | None = None
) -> torch.Tensor:
    """Centre within each group (minibatch group means) and whiten by the pooled within-group covariance.

    ``z (L^T)^-1`` with ``L L^T`` the pooled within-group covariance plus ``ridge`` times its mean
    variance: every direction of the within-group variation gets unit variance, not only every
    column. A per-column scaling is dominated by the block's largest within-group direction (in a
    trained ``z_b`` one direction held 90% of the within-batch variance), so class differences
    along the small directions, which a linear probe on the block still reads, went unmeasured;
    whitening measures them at their own scale (the class-mean spread of a whitened block is the
    linear discriminability a fresh probe exploits). ``ridge`` keeps the minibatch covariance
    invertible and stops near-empty directions from being amplified without bound (1e-3 let the
    encoders trade leaks between blocks; see :class:`FADVAE`). The covariance is not detached:
    with it detached the whitened terms' gradients blew training up.

    ``onehot``: the groups, ``(n, G)``. Blocks may be stacked (``z`` ``(P, n, d)``, ``onehot``
    ``(P, n, G)``, both zero-padded to a common width, :func:`_pad_columns`): one batched pass,
    each block whitened on its own; ``dims`` ``(P,)`` are the blocks' own widths, over which the
    mean variance of the ridge is taken (padding columns come back zero).
    """
    if z.dim() == 3 and dims is None:
        raise ValueError("_group_whiten: stacked blocks need dims, their own widths.")
    if z.shape[-2] < 2:
        return z - z.detach()
    counts = onehot.sum(-2)
    zc = z - onehot @ _group_means(onehot, z, counts)
    dof = (z.shape[-2] - (counts > 0).sum(-1)).clamp(min=1).to(z.dtype)  # (P,) or ()
    cov = zc.transpose(-1, -2) @ zc / dof[..., None, None]
    width = z.shape[-1] if dims is None else dims.to(z.dtype)
    scale = (cov.diagonal(dim1=-2, dim2=-1).sum(-1) / width).clamp(min=1e-8)
    eye = torch.eye(cov.shape[-1], dtype=z.dtype, device=z.device)
    cov = cov + (ridge * scale + 1e-6)[..., None, None] * eye
    chol = torch.linalg.cholesky(cov)
    return torch.linalg.solve_triangular(chol, zc.transpose(-1, -2), upper=False).transpose(-1, -2)


def _class_mean_spread(z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Between-class variance of a whitened block: ``sum_c w_c ||mean_c(z) - mean(z)||^2``.

    ``onehot``: the classes, ``(n, C)``; a cell left out (e.g. unlabelled) has a zero row. Means
    and weights ``w_c = n_c / n`` are over the cells kept; 0 with fewer than two classes present.
    Stacked blocks (``z`` ``(P, n, d)``, ``onehot`` ``(P, n, C)``) give ``(P,)``.
    """
    counts = onehot.sum(-2)  # (..., C)
    n = counts.sum(-1, keepdim=True).clamp(min=1)  # (..., 1)
    sums = onehot.transpose(-1, -2) @ z  # (..., C, d)
    mean = sums.sum(-2, keepdim=True) / n.unsqueeze(-1)
    dev = sums / counts.clamp(min=1).unsqueeze(-1) - mean  # empty classes weigh 0 below
    return ((counts / n).unsqueeze(-1) * dev.pow(2)).sum((-1, -2))


def _kernel_leak(
    z: torch.Tensor,
    group_onehot: torch.Tensor,
    target_onehot: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dependence of ``z`` on a class within each group: centred kernel alignment of an RBF kernel.

    Within every group (columns of ``group_onehot``), the RBF kernel on ``z`` is aligned with the
    same-class kernel of ``target_onehot``: ``<HKH, HLH> / (|HKH| |HLH|)`` in [0, 1], ``H`` the
    centring within the group. It is large when cells of one class lie closer to each other than to
    the rest of their group, which is what a nearest-neighbour probe reads inside a tight batch
    or label cluster, however small the variation and whether or not it is linear. The columns of
    ``z`` are scaled by their minibatch standard deviation (as a probe standardises them) and the
    kernel averages four bandwidths, 1/16, 1/4, 1 and 4 times the group's typical squared distance
    (twice the median squared distance of its cells to their group mean), so the measure does not
    depend on scale. Returns the mean over the groups that hold at least two classes and four
    cells, weighted by their size; ``mask`` leaves cells out (e.g. unlabelled ones).

    Inputs may carry a leading stack dimension (``z`` ``(P, n, d)``, one-hots ``(P, n, G)`` and
    ``(P, n, C)``): ``P`` independent measures in one pass, returned as ``(P,)``. Zero columns
    (padding to a common width) change nothing.
    """
    if z.dim() == 2:
        return _kernel_leak(
            z[None], group_onehot[None], target_onehot[None], None if mask is None else mask[None]
        )[0]
    n = z.shape[-2]
    if n < 4:
        return z.sum((-1, -2)) * 0.0
    dt = z.dtype
    og = group_onehot.to(dt)
    if mask is not None:
        og = og * mask.to(dt).unsqueeze(-1)
    ogt = og.transpose(-1, -2)  # (P, groups, cells)
    counts = ogt.sum(-1)  # cells per group
    zs = z / z.detach().std(-2, keepdim=True).clamp(min=1e-6)
    # centred within groups first: distances inside a group are unchanged, and the small
    # within-group differences do not drown in float32 rounding of the group offsets
    zs = zs - og @ _group_means(og, zs, counts)
    same = og @ ogt  # 1 for two cells of the same group (both kept)
    n_row = same.sum(-1).clamp(min=1.0)  # size of each cell's group
    with torch.no_grad():
        sq = zs.pow(2).sum(-1)
        nan = torch.full_like(ogt, float("nan"))
        med = torch.nanmedian(torch.where(ogt > 0, sq.unsqueeze(-2), nan), dim=-1).values
        bw = (og @ (2.0 * torch.nan_to_num(med, nan=0.0)).unsqueeze(-1)).clamp(min=1e-12)  # (P, n, 1)
        t = target_onehot.to(dt)
        lc = _centre_within(t @ t.transpose(-1, -2), same, og, n_row, counts)
        nl = _group_sums(ogt, lc * lc)
        valid = (nl > 1e-9) & (counts >= 4)
        w = counts * valid.to(dt)
        w = w / w.sum(-1, keepdim=True).clamp(min=1.0)
    return _KernelAlignment.apply(zs, bw, same, n_row, og, counts, lc, nl, w)


def _centre_within(a: torch.Tensor, same: torch.Tensor, og, n_row, counts) -> torch.Tensor:
    """``H a H`` within every group (``H`` the group's centring), zero between groups."""
    a = a * same
    r = a.sum(-1) / n_row
    m = (og @ _group_means(og, r.unsqueeze(-1), counts)).squeeze(-1)
    return (a - r.unsqueeze(-1) - r.unsqueeze(-2) + m.unsqueeze(-1)) * same


def _group_sums(ogt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-group sums of the entries of ``a`` ``(P, n, n)`` (every nonzero entry lies inside one group)."""
    return (ogt @ a.sum(-1, keepdim=True)).squeeze(-1)


def _rbf_mixture(d2: torch.Tensor, bw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of :func:`_kernel_leak` and its derivative in ``d2``: ``exp(-d2 / (4 bw))`` and its
    4th, 16th and 64th powers (bandwidths 4, 1, 1/4 and 1/16 times ``bw``; the smallest ones see
    what a probe's nearest neighbours see), averaged. The derivative ignores any clamp of ``d2``
    (the caller masks it)."""
    e = p = torch.exp(-d2 / (4.0 * bw))
    k, dk = e.clone(), e.clone()
    for power in (4.0, 16.0, 64.0):
        p = p.square().square()
        k.add_(p)
        dk.add_(p, alpha=power)
    return k.div_(4.0), dk.mul_(-1.0 / 16.0).div_(bw)


def _sq_dists(zs: torch.Tensor) -> torch.Tensor:
    """Squared distances between the rows of ``zs`` (``(..., n, n)``; may be slightly negative by rounding)."""
    sq = zs.pow(2).sum(-1)
    return sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * zs @ zs.transpose(-1, -2)


class _KernelAlignment(torch.autograd.Function):
    """Size-weighted mean over groups of ``<kc, lc> / (|kc| |lc|)``, ``kc`` the kernel of
    :func:`_rbf_mixture` on ``zs`` centred within groups, ``lc`` the centred class kernel (fixed),
    with a closed-form backward (about a third of the autograd graph's operations).

    Centring is a projection and ``lc`` is centred, so ``d<kc, lc>/dk = lc`` and
    ``d|kc|^2/dk = 2 kc``: ``d/dk = a lc + 2 b kc`` with ``a``, ``b`` the derivatives in the two
    per-group sums. ``G = d/dd2`` is that times the kernel's derivative, masked where the clamp of
    ``d2`` at 0 stopped the gradient, and ``d2_ij = |z_i - z_j|^2`` gives
    ``dz = 2 (rowsum(S) z - S z)`` for ``S = G + G^T``. ``w``: the groups' weights (0 for groups
    left out). The autograd formula is :func:`_kernel_alignment_reference` (tested equal).
    """

    @staticmethod
    def forward(ctx, zs, bw, same, n_row, og, counts, lc, nl, w):
        raw = _sq_dists(zs)
        k, dk = _rbf_mixture(raw.clamp(min=0.0), bw)
        kc = _centre_within(k, same, og, n_row, counts)
        ogt = og.transpose(-1, -2)
        # <kc, lc>, not the equal <k, lc>: the centred sum does not carry the rounding of k's mean
        num, nk = _group_sums(ogt, kc * lc), _group_sums(ogt, kc * kc)
        denom = (nk.clamp(min=1e-12) * nl.clamp(min=1e-12)).sqrt()
        cka = torch.where(w > 0, num / denom, torch.zeros_like(num))
        ctx.save_for_backward(zs, dk.mul_(raw >= 0), lc, kc, og, w, cka, nk, denom)
        return (w * cka).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        zs, dk, lc, kc, og, w, cka, nk, denom = ctx.saved_tensors
        gc = grad.unsqueeze(-1) * w  # d out / d cka, per group
        a = torch.where(w > 0, gc / denom, torch.zeros_like(gc))  # d / d num
        b = torch.where((w > 0) & (nk > 1e-12), -0.5 * gc * cka / nk.clamp(min=1e-12), torch.zeros_like(gc))
        a_i, b_i = (og @ a.unsqueeze(-1)), (og @ b.unsqueeze(-1))  # (P, n, 1): each cell's group
        g = (a_i * lc).add_(kc * (2.0 * b_i)).mul_(dk)  # d / d d2
        g = g + g.transpose(-1, -2)
        gz = 2.0 * (g.sum(-1, keepdim=True) * zs - g @ zs)
        return gz, None, None, None, None, None, None, None, None


def _kernel_alignment_reference(zs, bw, same, n_row, og, counts, lc, nl, w):
    """:class:`_KernelAlignment` by autograd: the formula its backward is tested against (tests only)."""
    d2 = _sq_dists(zs).clamp(min=0.0)
    e = p = torch.exp(-d2 / (4.0 * bw))
    k = e
    for _ in range(3):
        p = p.square().square()
        k = k + p
    kc = _centre_within(k / 4.0, same, og, n_row, counts)
    ogt = og.transpose(-1, -2)
    num, nk = _group_sums(ogt, kc * lc), _group_sums(ogt, kc * kc)
    cka = torch.where(w > 0, num / (nk.clamp(min=1e-12) * nl.clamp(min=1e-12)).sqrt(), torch.zeros_like(num))
    return (w * cka).sum(-1)


def _pad_columns(*xs: torch.Tensor) -> torch.Tensor:
    """Stack 2-d tensors of equal rows, zero-padding their columns to the widest."""
    width = max(x.shape[-1] for x in xs)
    return torch.stack([F.pad(x, (0, width - x.shape[-1])) for x in xs])


def _one_hot(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``F.one_hot(index.reshape(-1), n)`` in ``dtype`` for registry codes (integer-valued, any dtype)
    known to lie in ``[0, n)``: one comparison, without the range check's host synchronisation
    (several per training step). A code outside the range gives a zero row, not an error: only
    codes of the AnnData registry, mapped at setup, come here."""
    return (index.reshape(-1, 1) == torch.arange(n, device=index.device)).to(dtype)


def _zinb_log_prob_reference(x, mu, theta, zi_logits, eps: float = 1e-8) -> torch.Tensor:
    """ZINB log-likelihood per entry by autograd, equal to scvi-tools' ``log_zinb_positive`` (the reference
    for :class:`_ZINBLogProb`; used when ``x`` requires a gradient).

    Cheaper than the distribution object on the training path: no support validation (a
    ``remainder`` over the whole minibatch), ``lgamma``/``log`` of a gene-wise ``theta`` taken once
    per gene rather than per entry, and one ``where`` instead of two masked products.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = -zi_logits + theta * (torch.log(theta + eps) - log_theta_mu)
    with torch.no_grad():
        lgamma_x1 = torch.lgamma(x + 1)
    non_zero = (
        pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - lgamma_x1
    )
    return torch.where(x > eps, non_zero, F.softplus(pi_theta_log)) - F.softplus(-zi_logits)


# table of lgamma(k + theta) - lgamma(theta) - lgamma(k + 1) and digamma(k + theta) - digamma(theta)
# for counts k < _ZINB_TABLE (per gene); larger counts are computed directly
_ZINB_TABLE = 16


def _count_tables(theta: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, Psi)``, both ``(n_rows, G)``: for integer ``k`` and per-gene ``theta``,
    ``D[k] = lgamma(k + theta) - lgamma(theta) - lgamma(k + 1) = sum_{j<k} log((theta + j) / (j + 1))``
    and ``Psi[k] = digamma(k + theta) - digamma(theta) = sum_{j<k} 1 / (theta + j)`` (float64 sums).
    """
    t = theta.detach().double()
    j = torch.arange(n_rows - 1, dtype=torch.float64, device=theta.device).unsqueeze(-1)
    tj = t + j  # (n_rows - 1, G)
    zero = t.new_zeros((1, t.shape[-1]))
    d = torch.cat([zero, torch.cumsum(torch.log(tj / (j + 1.0)), 0)])
    psi = torch.cat([zero, torch.cumsum(tj.reciprocal(), 0)])
    return d.to(theta.dtype), psi.to(theta.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and grad.shape[i + lead] != 1
    )
    return grad.sum(dims, keepdim=False).reshape(shape) if dims else grad


class _ZINBLogProb(torch.autograd.Function):
    """:func:`zinb_log_prob` as one autograd node with a closed-form backward.

    With ``L = log(theta + mu + eps)`` and ``P = -pi + theta (log(theta + eps) - L)`` (``pi`` the
    zero-inflation logits), the log-likelihood is ``P + x (log(mu + eps) - L) + D(x, theta)`` where
    ``x > eps`` and ``softplus(P)`` elsewhere, minus ``softplus(-pi)``, with ``D = lgamma(x + theta) -
    lgamma(theta) - lgamma(x + 1)``. With ``m = [x > eps]``, ``w = dll/dP = m + (1 - m) sigmoid(P)`` and
    ``x' = m x``:

    - ``dll/dpi = sigmoid(-pi) - w``
    - ``dll/dmu = x' / (mu + eps) - (w theta + x') / (theta + mu + eps)``
    - ``dll/dtheta = w (log(theta + eps) - L + theta / (theta + eps) - theta / (theta + mu + eps))
      - x' / (theta + mu + eps) + m (digamma(x + theta) - digamma(theta))``

    The branches are blended with the 0/1 mask ``m`` (``a m + b (1 - m)``, exact for finite values)
    rather than ``torch.where``, several times slower on the CPU. On the CPU, for integer counts and a
    per-gene ``theta``, ``D`` and the digamma difference are read from per-gene tables of the small
    counts (:func:`_count_tables`), which replaces two ``lgamma`` and one ``digamma`` over the whole
    minibatch (the costliest elementwise ops of a step).
    """

    @staticmethod
    def forward(ctx, x, mu, theta, zi_logits, eps):
        # (table indices are built in float32: exact below 2**24 entries)
        integer = (
            x.device.type == "cpu"
            and x.dim() == 2
            and theta.dim() == 1
            and _ZINB_TABLE * x.shape[-1] < 2**24
            and _is_integer(x)
        )
        # 0/1 mask of the entries on the non-zero branch (x > eps); for integer counts a clamp
        m = x.clamp(0.0, 1.0) if integer else (x > eps).to(mu.dtype)
        t_eps = theta + eps
        tm = mu + t_eps
        log_tm = torch.log(tm)
        log_t = torch.log(t_eps)
        p = (log_t - log_tm).mul_(theta).sub_(zi_logits)
        need_psi = ctx.needs_input_grad[2]
        d, psi = _lgamma_terms(x, theta, m, need_psi, integer)
        nonzero = (torch.log(mu + eps) - log_tm).mul_(x).add_(p).add_(d)
        out = nonzero.mul_(m).add_(F.softplus(p).mul_(1.0 - m)).sub_(F.softplus(-zi_logits))
        ctx.eps = eps
        ctx.save_for_backward(x, mu, theta, zi_logits, m, tm, log_tm, log_t, p, psi)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mu, theta, zi_logits, m, tm, log_tm, log_t, p, psi = ctx.saved_tensors
        eps = ctx.eps
        w = torch.sigmoid(p).mul_(1.0 - m).add_(m)
        xn = x * m
        inv_tm = tm.reciprocal()
        g_pi = g_mu = g_theta = None
        if ctx.needs_input_grad[3]:
            g_pi = _sum_to(torch.sigmoid(-zi_logits).sub_(w).mul_(grad), zi_logits.shape)
        if ctx.needs_input_grad[1]:
            g_mu = (xn / (mu + eps)).sub_((w * theta).add_(xn).mul_(inv_tm))
            g_mu = _sum_to(g_mu.mul_(grad), mu.shape)
        if ctx.needs_input_grad[2]:
            dp = (log_t + theta / (theta + eps)) - log_tm
            dp = dp.sub_(theta * inv_tm)
            g_t = dp.mul_(w).sub_(xn.mul_(inv_tm)).add_(psi)
            g_theta = _sum_to(g_t.mul_(grad), theta.shape)
        return None, g_mu, g_theta, g_pi, None


def _is_integer(x: torch.Tensor) -> bool:
    return float((x - torch.round(x)).abs().max()) == 0.0 if x.numel() else True


def _lgamma_terms(x, theta, m, need_psi, integer):
    """``D = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` and, if ``need_psi``, ``m (digamma(x +
    theta) - digamma(theta))`` (None otherwise); ``m`` the 0/1 mask of ``x > eps``. ``integer``: ``x``
    holds integers (2-d, on the CPU) and ``theta`` is per gene, so both come from per-gene tables."""
    if not integer:
        d = torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
        psi = (torch.digamma(x + theta) - torch.digamma(theta)).mul_(m) if need_psi else None
        return d, psi
    n_genes = x.shape[-1]
    d_tab, psi_tab = _count_tables(theta, _ZINB_TABLE)
    # flat index k * G + g of the table entry of each count (counts >= the table: fixed below)
    cols = torch.arange(n_genes, dtype=x.dtype, device=x.device)
    idx = x.clamp(0.0, _ZINB_TABLE - 1).mul_(n_genes).add_(cols).int().reshape(-1)
    d = d_tab.reshape(-1).index_select(0, idx).reshape(x.shape)
    psi = psi_tab.reshape(-1).index_select(0, idx).reshape(x.shape) if need_psi else None
    if x.numel() and float(x.max()) >= _ZINB_TABLE:
        big = (x >= _ZINB_TABLE).nonzero(as_tuple=True)
        xb, tb = x[big], theta[big[1]]
        d[big] = torch.lgamma(xb + tb) - torch.lgamma(tb) - torch.lgamma(xb + 1)
        if need_psi:
            psi[big] = torch.digamma(xb + tb) - torch.digamma(tb)
    return d, psi


def zinb_log_prob(x, mu, theta, zi_logits, eps: float = 1e-8) -> torch.Tensor:
    """ZINB log-likelihood per entry, equal to scvi-tools' ``log_zinb_positive``.

    Cheaper than the distribution object on the training path: no support validation, ``lgamma`` /
    ``log`` of a gene-wise ``theta`` taken once per gene, and one autograd node with a closed-form
    backward (:class:`_ZINBLogProb`; the same values and gradients as the autograd formula
    :func:`_zinb_log_prob_reference` within float rounding, tested).
    """
    if x.requires_grad:
        return _zinb_log_prob_reference(x, mu, theta, zi_logits, eps)
    return _ZINBLogProb.apply(x, mu, theta, zi_logits, eps)


def _fusable(enc: Encoder) -> bool:
    """``enc`` is a Gaussian scvi :class:`~scvi.nn.Encoder` whose layers are Linear, LayerNorm (no
    affine) and ReLU only (what :func:`_fused_posteriors` computes)."""
    if enc.distribution != "normal" or enc.var_activation is not torch.exp:
        return False
    for layer in enc.encoder.fc_layers:
        lin, bn, norm, act, drop = layer
        if bn is not None or drop is not None or not isinstance(act, nn.ReLU) or lin.bias is None:
            return False
        if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
            return False
    return True


def _one_hots(fc: FCLayers, cats, dtype) -> torch.Tensor | None:
    """The covariate one-hots an :class:`~scvi.nn.FCLayers` concatenates to its inputs, as one tensor."""
    parts = []
    for n_cat, cat in zip(fc.n_cat_list, cats, strict=False):
        if n_cat > 1:
            parts.append(cat.to(dtype) if cat.size(1) == n_cat else _one_hot(cat, n_cat, dtype))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _fused_posteriors(encs: list[Encoder], x: torch.Tensor, cov, x2=None, cov2=None):
    """Posterior ``(loc, scale)`` of every encoder in ``encs`` on ``x``, and of ``encs[1]`` on ``x2``.

    The same function as calling each :class:`~scvi.nn.Encoder` (Linear, LayerNorm, ReLU per layer
    with the covariate one-hots ``cov`` concatenated to every layer's input; ``loc`` and ``exp`` of the
    variance head plus ``var_eps``), computed for all encoders at once: the first layers as one
    ``Linear`` with the encoders' weights stacked along the outputs (they read the same input), the
    later layers and the mean / variance heads as batched matmuls over the encoders (heads padded with
    zero rows to the widest latent; the padding is sliced off). Every value is the dot product the
    encoder computes on its own, summed in another order (float rounding). ``x2`` (the labelled
    minibatch, as many cells as ``x``) runs through ``encs[1]`` in the same batched ops.
    """
    n = x.shape[0]
    fcs = [enc.encoder for enc in encs]
    slots = list(encs) if x2 is None else [*encs, encs[1]]
    first = [fc.fc_layers[0][0] for fc in fcs]
    n_hidden = first[0].out_features
    norm = fcs[0].fc_layers[0][2]
    xin = x if cov is None else torch.cat([x, cov], -1)
    w0 = torch.cat([lin.weight for lin in first])
    b0 = torch.cat([lin.bias for lin in first])
    h = F.linear(xin, w0, b0).view(n, len(encs), n_hidden).transpose(0, 1)
    covs = None if cov is None else [cov] * len(encs)
    if x2 is not None:
        xin2 = x2 if cov2 is None else torch.cat([x2, cov2], -1)
        h2 = F.linear(xin2, first[1].weight, first[1].bias)
        h = torch.cat([h, h2.unsqueeze(0)])
        covs = None if cov is None else [*covs, cov2]
    h = F.relu(F.layer_norm(h, (n_hidden,), None, None, norm.eps))
    cov_all = None if covs is None else torch.stack(covs)
    for i in range(1, len(fcs[0].fc_layers)):
        lins = [enc.encoder.fc_layers[i][0] for enc in slots]
        w = torch.stack([lin.weight for lin in lins])
        b = torch.stack([lin.bias for lin in lins]).unsqueeze(1)
        inp = torch.cat([h, cov_all], -1) if (cov_all is not None and fcs[0].inject_into_layer(i)) else h
        h = F.relu(F.layer_norm(torch.baddbmm(b, inp, w.transpose(1, 2)), (n_hidden,), None, None, norm.eps))
    dims = [enc.mean_encoder.out_features for enc in encs]
    d_max = max(dims)
    heads_w, heads_b = {}, {}
    for k, enc in enumerate(encs):
        pad = d_max - dims[k]
        parts_w = [enc.mean_encoder.weight, enc.var_encoder.weight]
        parts_b = [enc.mean_encoder.bias, enc.var_encoder.bias]
        if pad:
            parts_w = [F.pad(p, (0, 0, 0, pad)) for p in parts_w]
            parts_b = [F.pad(p, (0, pad)) for p in parts_b]
        heads_w[k], heads_b[k] = torch.cat(parts_w), torch.cat(parts_b)
    order = list(range(len(encs))) + ([1] if x2 is not None else [])
    w = torch.stack([heads_w[k] for k in order])
    b = torch.stack([heads_b[k] for k in order]).unsqueeze(1)
    out = torch.baddbmm(b, h, w.transpose(1, 2))
    loc = out[..., :d_max]
    scale = (torch.exp(out[..., d_max:]) + encs[0].var_eps).sqrt()
    res = []
    for s, k in enumerate(order):
        res.append((loc[s, :, : dims[k]], scale[s, :, : dims[k]]))
    return res


def cross_covariance_penalty(zs: list[torch.Tensor]) -> torch.Tensor:
    """Sum over pairs of blocks of the squared Frobenius norm of their cross-covariance."""
    n = zs[0].shape[-2]
    if n < 2:
        return zs[0].sum() * 0.0
    centred = [z - z.mean(-2, keepdim=True) for z in zs]
    total = zs[0].new_zeros(())
    for i in range(len(centred)):
        for j in range(i + 1, len(centred)):
            c = centred[i].transpose(-1, -2) @ centred[j] / (n - 1)
            total = total + c.pow(2).sum((-1, -2)).mean()
    return total


class FADVAE(BaseModuleClass):
    """Factor-disentangled VAE: three encoders (batch, label, residual) and one decoder.

    ``z = [z_b, z_l, z_r]``. Each block has its own batch-conditioned Gaussian encoder. The priors
    are conditional: ``p(z_b | s) = N(m_s, I)`` with a learned mean per batch, ``p(z_l | y) =
    N(m_y, I)`` with a learned mean per label (unlabeled cells: the label posterior of the label
    head weights the components), and ``p(z_r) = N(0, I)``. Information in ``z_b`` (``z_l``) beyond
    the batch (label) is charged ``beta_b`` (``beta_l``) times the KL of ``z_r``, so variation that is
    neither batch nor label is cheapest in ``z_r``. One scVI decoder maps ``z`` (with the batch and
    categorical covariates injected) to the likelihood.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batches (at least 1).
    n_labels
        Number of label classes (the unlabeled category excluded).
    n_label_codes
        Number of label codes in the registry (``n_labels`` plus one when an unlabeled category is
        registered); sets the width of ``gene-label`` dispersion.
    unlabeled_code
        Registry code of the unlabeled category, or ``None``.
    n_hidden, n_latent_b, n_latent_l, n_latent_r, n_layers, dropout_rate, dispersion, gene_likelihood
        See :class:`cellvi.FADVI`.
    use_observed_lib_size, library_log_means, library_log_vars
        Observed library size, or a latent one with a per-batch log-normal prior.
    n_continuous_cov, n_cats_per_cov
        Continuous covariates (count) and categories per categorical covariate.
    use_size_factor_key
        Use the registered size factor (log) instead of the library size as the offset.
    log_variational
        ``log1p`` the counts before encoding.
    beta, lambda_b, lambda_l, alpha_bl, alpha_lb, alpha_rb, alpha_rl, gamma
        Loss weights; see :class:`cellvi.FADVI`.
    beta_b, beta_l
        Extra KL weight on ``z_b`` and ``z_l`` relative to ``z_r``.
    adversary_scale
        Scale of all adversarial terms (comparable to ``lambda_*``).
    alpha_res
        Weight of the "``z_b`` / ``z_l`` must not predict ``z_r``" terms.
    whiten_ridge
        Ridge, relative to the mean within-group variance, added to the minibatch covariance by
        which the adversaries whiten each block (see below).
    alpha_kernel
        Weight of the within-group kernel alignment of ``z_b`` with the label and of ``z_l`` with
        the batch (:func:`_kernel_leak`), relative to the class-mean spread; 0 turns it off.

    Notes
    -----
    **Leak measurement.** Each adversary reads its block centred within groups (``z_b`` within
    batches, ``z_l`` within labels, ``z_r`` over the minibatch) and *whitened* by the pooled
    within-group covariance (ridge ``whiten_ridge``), and the encoders also pay the class-mean
    spread of that whitened block. Before, blocks were scaled column by column: in a trained
    ``z_b`` one within-batch direction held ~90% of the variance, so every column's scale was set
    by it and the label differences along the small directions went unmeasured, while a fresh
    logistic probe still read them (label from ``z_b`` 0.44 balanced accuracy on the default
    ``benchmarks/fadvi.py`` data, where the batch alone gives 0.20). Measured with fresh probes on
    that data (4000 cells x 1000 genes, 3 batches, 6 types, 30 epochs; data seeds 0 / 1; balanced
    accuracy, R^2 for the residual), column scaling (seed 0) -> whitening with the residual-from-
    ``z_b`` term at 2x: label from ``z_b`` 0.44 -> 0.24 / 0.37 (the batch composition alone gives
    0.20 / 0.22: the floor for a ``z_b`` that holds the batch), batch from ``z_l`` 0.72 -> 0.47 /
    0.47, batch from ``z_r`` 0.66 -> 0.43 / 0.46, label from ``z_r`` 0.34 -> 0.20 / 0.18, residual
    from ``z_b`` 0.20 -> 0.02 / 0.02 and from ``z_l`` 0.18 -> 0.02 / 0.00, label ASW of ``z_l``
    0.80 -> 0.82 / 0.85, batch mixing in ``z_l`` 0.92 -> 0.89 / 0.91. Tried and rejected (seed 0):
    whitening ``z_b`` alone (label from ``z_b`` at the floor, the ``z_l``/``z_r`` leaks unchanged),
    ridge 1e-3 (the encoders moved the residual program into ``z_b``, R^2 0.67), a detached
    covariance (training diverged), a whitened target for the residual adversaries (residual
    from ``z_b`` R^2 0.98), the residual adversaries on column-scaled blocks (batch from ``z_l``
    0.84), the label-from-``z_b`` term at 1x (0.62), 10x (0.67) or 20x (0.59), ``alpha_res`` = 1.5
    or 3 for both residual terms (batch from ``z_l`` 0.91 / 0.99), ``beta_b`` = 15 (label from
    ``z_b`` 0.45 under column scaling). The adversarial game is sensitive: single runs of one
    setting differ by up to ~0.15 in a leak between data seeds.

    **Nearest-neighbour leaks.** With the terms above, the leaks left in ``z_b`` and ``z_r`` were
    read by the probes' nearest-neighbour half, not the linear one (data seed 1: label from
    ``z_b`` 0.32 by kNN, 0.22 linear, floor 0.22). Inside one batch, ``z_b``'s near-empty
    directions (within-batch variance ~1e-4, 29 of 30) still sorted the cells by label (kNN 0.50
    on them alone, chance 0.17); a probe standardises every column and its neighbours sit inside
    one tight batch cluster, so that structure counts whatever its scale, while the whitening
    ridge hides it from the adversaries. Hence the within-group kernel alignment
    (:func:`_kernel_leak`, weight ``alpha_kernel``) for ``z_b`` (label within batch) and ``z_l``
    (batch within label), and the batch-from-``z_r`` term at 8x (its near-empty directions held
    batch offsets of ~0.2 within-sd that a logistic probe combines to 0.45). Screened on
    ``benchmarks/fadvi.py`` data (3-5 data seeds each, the kNN / linear leaks printed by fresh
    probes): the alignment on ``z_b``/``z_l`` took label from ``z_b`` to the floor on seed 1 (0.21),
    batch from ``z_l`` to 0.42-0.48; at weight 2 (with the 8x term) the encoders moved the
    residual program into ``z_b`` (R^2 0.84 on seed 1) to dilute the label structure; the
    alignment on ``z_r`` as well raised batch from ``z_r`` (raw columns: 0.67 on seed 1;
    whitened: 0.41-0.48 on seeds 0-2); a ridge of 1e-3 for ``z_r`` alone gave 0.39-0.54; the
    batch-from-``z_r`` term at 4x gave 0.36-0.47 over 13 runs, at 8x 0.35-0.36 on the two seeds
    that were worst at 4x. Labels for the alignment of ``z_b`` include the label head's
    prediction for unlabelled cells, and the smallest bandwidth (1/16) was added after both
    lowered label from ``z_b`` on the two worst seeds (0.25 / 0.31 -> 0.22 / 0.26).
    """

    # the label-from-z_b term weighs 5x on the encoder side (z_b's encoder sees the counts, which
    # carry the label strongly; with whitened blocks, 1x left label from z_b at 0.62, see Notes);
    # the batch-from-z_r term 8x: z_r's encoder is handed the batch one-hot, and its near-empty
    # directions kept small batch offsets that a linear probe combines (see Notes)
    _ADV_BOOST: ClassVar[dict[str, float]] = {"bl": 5.0, "rb": 8.0}
    # and the residual-from-z_b terms 4x: against whitened label terms, z_b's encoder can dilute
    # its label directions with the residual program (label-independent variance); at 1x z_b
    # took it up (R^2 0.84 on the test's confounded data, 0.22-0.43 on the benchmark's), at 2x
    # 0.00-0.02; with the kernel alignment (which dilution also lowers) 2x let it back up to
    # 0.22-0.32 on the test's data (seeds 0-2), 4x 0.01-0.06 (see Notes)
    _RES_BOOST: ClassVar[dict[str, float]] = {"br": 4.0}

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_label_codes: int | None = None,
        unlabeled_code: int | None = None,
        n_hidden: int = 128,
        n_latent_b: int = 30,
        n_latent_l: int = 30,
        n_latent_r: int = 10,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        use_observed_lib_size: bool = True,
        library_log_means=None,
        library_log_vars=None,
        n_continuous_cov: int = 0,
        n_cats_per_cov: list[int] | None = None,
        use_size_factor_key: bool = False,
        log_variational: bool = True,
        beta: float = 1.0,
        lambda_b: float = 50.0,
        lambda_l: float = 50.0,
        alpha_bl: float = 1.0,
        alpha_lb: float = 1.0,
        alpha_rb: float = 1.0,
        alpha_rl: float = 1.0,
        gamma: float = 1.0,
        beta_b: float = 5.0,
        beta_l: float = 2.0,
        adversary_scale: float = 50.0,
        alpha_res: float = 1.0,
        whiten_ridge: float = 1e-2,
        alpha_kernel: float = 1.0,
    ):
        super().__init__()
        self.n_input = n_input
        self.n_batch = max(1, n_batch)
        self.n_labels = n_labels
        self.n_label_codes = n_label_codes or n_labels
        self.unlabeled_code = unlabeled_code
        self.n_latent_b, self.n_latent_l, self.n_latent_r = n_latent_b, n_latent_l, n_latent_r
        # the blocks' widths, for the stacked whitening (a buffer: no host-to-device copy per step)
        self.register_buffer(
            "_block_dims", torch.tensor([n_latent_b, n_latent_l, n_latent_r]), persistent=False
        )
        self.dispersion = dispersion
        self.gene_likelihood = gene_likelihood
        self.use_observed_lib_size = use_observed_lib_size
        self.use_size_factor_key = use_size_factor_key
        self.log_variational = log_variational
        self.n_continuous_cov = n_continuous_cov
        self.beta, self.beta_b, self.beta_l = beta, beta_b, beta_l
        self.lambda_b, self.lambda_l = lambda_b, lambda_l
        self.alpha = {"bl": alpha_bl, "lb": alpha_lb, "rb": alpha_rb, "rl": alpha_rl}
        self.gamma = gamma
        self.adversary_scale = adversary_scale
        self.alpha_res = alpha_res
        self.whiten_ridge = check_number(whiten_ridge, "whiten_ridge", inclusive=False)
        self.alpha_kernel = check_number(alpha_kernel, "alpha_kernel")
        # compute the three encoders in one fused pass (_fused_posteriors); False: one call each
        self.fuse_encoders = True
        # scvi-tools' RNASeqMixin reads these
        self.minified_data_type = None
        self.latent_distribution = "normal"

        if not use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError(
                    "library_log_means and library_log_vars are required when use_observed_lib_size=False."
                )
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means, dtype=torch.float32))
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars, dtype=torch.float32))

        if dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_input))
        elif dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(n_input, self.n_batch))
        elif dispersion == "gene-label":
            self.px_r = nn.Parameter(torch.randn(n_input, self.n_label_codes))
        elif dispersion != "gene-cell":
            raise ValueError(
                f"dispersion must be one of 'gene', 'gene-batch', 'gene-label', 'gene-cell', got {dispersion!r}."
            )
        if gene_likelihood not in ("zinb", "nb", "poisson"):
            raise ValueError(
                f"gene_likelihood must be one of 'zinb', 'nb', 'poisson', got {gene_likelihood!r}."
            )

        cat_list = [self.n_batch, *(n_cats_per_cov or [])]
        n_in = n_input + n_continuous_cov
        common = {
            "n_cat_list": cat_list,
            "n_layers": n_layers,
            "n_hidden": n_hidden,
            "inject_covariates": True,
            "return_dist": True,
            # The encoders compute the same function in training and at inference (LayerNorm,
            # no dropout): the adversaries then see exactly the embedding users get. With
            # BatchNorm running statistics (which lag the weights) or dropout noise, a batch
            # signal hidden from the adversaries during training reappears at inference.
            "dropout_rate": 0.0,
            "use_batch_norm": False,
            "use_layer_norm": True,
        }
        self.encoders = nn.ModuleDict(
            {
                k: Encoder(n_in, d, **common)
                for k, d in zip(BLOCKS, (n_latent_b, n_latent_l, n_latent_r), strict=True)
            }
        )
        self.l_encoder = Encoder(
            n_in,
            1,
            n_layers=1,
            n_cat_list=cat_list,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            return_dist=True,
        )
        n_latent = n_latent_b + n_latent_l + n_latent_r
        self.decoder = DecoderSCVI(
            n_latent + n_continuous_cov,
            n_input,
            n_cat_list=cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=True,
            use_batch_norm=True,
            use_layer_norm=False,
            scale_activation="softmax",
        )
        # conditional prior means, stored (latent x classes) so that scArches' query mapping
        # appends the columns of new batches / labels along the last dimension
        self.prior_mean_b = nn.Parameter(torch.randn(n_latent_b, self.n_batch))
        self.prior_mean_l = nn.Parameter(torch.randn(n_latent_l, max(1, n_labels)))

        heads = {
            "batch": (n_latent_b, self.n_batch),
            "label": (n_latent_l, n_labels),
            "adv_label_from_b": (n_latent_b, n_labels),
            "adv_batch_from_l": (n_latent_l, self.n_batch),
            "adv_batch_from_r": (n_latent_r, self.n_batch),
            "adv_label_from_r": (n_latent_r, n_labels),
            "adv_res_from_b": (n_latent_b, n_latent_r),
            "adv_res_from_l": (n_latent_l, n_latent_r),
        }
        # adversaries without dropout: they stand in for a fresh probe, which has none (and a noisy
        # adversary lets a leak through that a probe still finds; measured on confounded data)
        self.heads = nn.ModuleDict(
            {
                k: _Head(i, o, n_hidden, 0.0 if k.startswith("adv_") else dropout_rate)
                for k, (i, o) in heads.items()
            }
        )

    # ------------------------------------------------------------------ inputs
    def forward(self, tensors, *args, loss_kwargs: dict | None = None, **kwargs):
        """scvi's forward pass; a ``(full, labelled)`` pair of minibatches is accepted.

        The semi-supervised loaders yield a minibatch of all cells and one of labelled cells. The
        forward pass runs on the full one; the labelled one reaches :meth:`loss` as
        ``labelled_tensors`` (the label head learns on it too).
        """
        if isinstance(tensors, (tuple, list)):
            full, *rest = tensors
            if rest and rest[0] is not None:
                loss_kwargs = {**(loss_kwargs or {}), "labelled_tensors": rest[0]}
                if kwargs.get("compute_loss", True):
                    kwargs["inference_kwargs"] = {
                        **(kwargs.get("inference_kwargs") or {}),
                        "labelled": rest[0],
                    }
            tensors = full
        return super().forward(tensors, *args, loss_kwargs=loss_kwargs, **kwargs)

    def _get_inference_input(self, tensors, full_forward_pass: bool = False):
        return {
            MODULE_KEYS.X_KEY: tensors[REGISTRY_KEYS.X_KEY],
            MODULE_KEYS.BATCH_INDEX_KEY: tensors[REGISTRY_KEYS.BATCH_KEY],
            MODULE_KEYS.CONT_COVS_KEY: tensors.get(REGISTRY_KEYS.CONT_COVS_KEY, None),
            MODULE_KEYS.CAT_COVS_KEY: tensors.get(REGISTRY_KEYS.CAT_COVS_KEY, None),
        }

    def _get_generative_input(self, tensors, inference_outputs):
        size_factor = tensors.get(REGISTRY_KEYS.SIZE_FACTOR_KEY, None)
        if size_factor is not None:
            size_factor = torch.log(size_factor)
        return {
            MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.Z_KEY],
            MODULE_KEYS.LIBRARY_KEY: inference_outputs[MODULE_KEYS.LIBRARY_KEY],
            MODULE_KEYS.BATCH_INDEX_KEY: tensors[REGISTRY_KEYS.BATCH_KEY],
            MODULE_KEYS.Y_KEY: tensors[REGISTRY_KEYS.LABELS_KEY],
            MODULE_KEYS.CONT_COVS_KEY: tensors.get(REGISTRY_KEYS.CONT_COVS_KEY, None),
            MODULE_KEYS.CAT_COVS_KEY: tensors.get(REGISTRY_KEYS.CAT_COVS_KEY, None),
            MODULE_KEYS.SIZE_FACTOR_KEY: size_factor,
        }

    @staticmethod
    def _cats(cat_covs):
        return torch.split(cat_covs.long(), 1, dim=1) if cat_covs is not None else ()

    # --------------------------------------------------------------- inference
    def _encoder_input(self, x, cont_covs):
        x_ = torch.log1p(x) if self.log_variational else x
        if cont_covs is not None and self.n_continuous_cov > 0:
            x_ = torch.cat([x_, cont_covs], dim=-1)
        return x_

    def _can_fuse(self, x) -> bool:
        encs = [self.encoders[k] for k in BLOCKS]
        return (
            self.fuse_encoders
            and x.dim() == 2
            and all(_fusable(e) for e in encs)
            and len({e.var_eps for e in encs}) == 1
            and len({e.encoder.fc_layers[0][0].out_features for e in encs}) == 1
            and len({len(e.encoder.fc_layers) for e in encs}) == 1
        )

    def _posteriors(self, x, batch_index, cont_covs=None, cat_covs=None, labelled=None):
        """``{block: (loc, scale)}`` of the three posteriors, and ``"l_labelled"`` (the ``z_l`` posterior
        of the labelled minibatch ``labelled``) when given and as large as ``x``.

        One fused pass (:func:`_fused_posteriors`) when the encoders allow it (``fuse_encoders``);
        it draws and discards the standard normals each :class:`~scvi.nn.Encoder` call draws for its
        unused sample, so the random stream (and seeded training) is the one of separate calls.
        """
        x_ = self._encoder_input(x, cont_covs)
        cats = (batch_index, *self._cats(cat_covs))
        if not self._can_fuse(x_):
            out = {}
            for k in BLOCKS:
                q = self.encoders[k](x_, *cats)[0]
                out[k] = (q.loc, q.scale)
            return out
        fc = self.encoders["b"].encoder
        cov = _one_hots(fc, cats, x_.dtype)
        x2 = cov2 = None
        if labelled is not None and labelled[REGISTRY_KEYS.X_KEY].shape[0] == x.shape[0]:
            x2 = self._encoder_input(labelled[REGISTRY_KEYS.X_KEY], labelled.get(REGISTRY_KEYS.CONT_COVS_KEY))
            cats2 = (labelled[REGISTRY_KEYS.BATCH_KEY], *self._cats(labelled.get(REGISTRY_KEYS.CAT_COVS_KEY)))
            cov2 = _one_hots(fc, cats2, x_.dtype)
        res = _fused_posteriors([self.encoders[k] for k in BLOCKS], x_, cov, x2, cov2)
        out = dict(zip(BLOCKS, res[:3], strict=True))
        for loc, _ in res[:3]:
            torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        if x2 is not None:
            out["l_labelled"] = res[3]
        return out

    def encode(self, x, batch_index, cont_covs=None, cat_covs=None) -> dict[str, Normal]:
        """Posterior distributions ``q(z_b|x,s)``, ``q(z_l|x,s)``, ``q(z_r|x,s)``."""
        post = self._posteriors(x, batch_index, cont_covs, cat_covs)
        return {k: Normal(*post[k]) for k in BLOCKS}

    @auto_move_data
    def inference(
        self,
        x,
        batch_index,
        cont_covs=None,
        cat_covs=None,
        n_samples: int = 1,
        use_mean: bool = False,
        labelled: dict[str, torch.Tensor] | None = None,
    ):
        """Encode a minibatch; ``use_mean`` returns posterior means in place of samples.

        ``labelled``: the labelled minibatch of a training step; its ``z_l`` posterior mean is
        computed in the same fused pass (``"qz_l_labelled_loc"``, read by :meth:`loss`).
        """
        post = self._posteriors(x, batch_index, cont_covs, cat_covs, labelled)
        # validated once, as qz (the blocks' parameters are its columns)
        qs = {k: Normal(*post[k], validate_args=False) for k in BLOCKS}
        zs = {}
        for k, q in qs.items():
            if use_mean:
                z = q.loc if n_samples == 1 else q.loc.expand((n_samples, *q.loc.shape))
            else:
                z = q.rsample() if n_samples == 1 else q.rsample((n_samples,))
            zs[k] = z
        z = torch.cat([zs[k] for k in BLOCKS], dim=-1)
        qz = Normal(torch.cat([qs[k].loc for k in BLOCKS], -1), torch.cat([qs[k].scale for k in BLOCKS], -1))

        ql = None
        if self.use_observed_lib_size:
            library = torch.log(x.sum(1, keepdim=True).clamp(min=1e-8))
            if n_samples > 1:
                library = library.expand((n_samples, *library.shape))
        else:
            ql, library = self.l_encoder(
                self._encoder_input(x, cont_covs), batch_index, *self._cats(cat_covs)
            )
            if use_mean:
                library = ql.loc
            if n_samples > 1:
                library = ql.loc.expand((n_samples, *ql.loc.shape)) if use_mean else ql.sample((n_samples,))
        return {
            MODULE_KEYS.Z_KEY: z,
            MODULE_KEYS.QZ_KEY: qz,
            MODULE_KEYS.QL_KEY: ql,
            MODULE_KEYS.LIBRARY_KEY: library,
            "z_b": zs["b"],
            "z_l": zs["l"],
            "z_r": zs["r"],
            "qz_b": qs["b"],
            "qz_l": qs["l"],
            "qz_r": qs["r"],
            "qz_l_labelled_loc": post["l_labelled"][0] if "l_labelled" in post else None,
        }

    # -------------------------------------------------------------- generative
    def batch_shift(self, batch_index: torch.Tensor, transform_batch) -> torch.Tensor:
        """Shift ``m_t - m_s`` of ``z_b`` that moves cells of batch ``s`` to batch ``t``."""
        m = self.prior_mean_b.T  # (n_batch, d_b)
        src = batch_index.reshape(-1).long()
        tgt = torch.full_like(src, int(transform_batch))
        return m[tgt] - m[src]

    @auto_move_data
    def generative(
        self,
        z,
        library,
        batch_index,
        cont_covs=None,
        cat_covs=None,
        size_factor=None,
        y=None,
        transform_batch=None,
    ):
        """Decode ``z``; ``transform_batch`` moves ``z_b`` to that batch and decodes as that batch."""
        from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

        if transform_batch is not None:
            shift = self.batch_shift(batch_index, transform_batch)
            pad = z.new_zeros((*z.shape[:-1], self.n_latent_l + self.n_latent_r))
            z = z + torch.cat([shift.expand((*z.shape[:-1], shift.shape[-1])), pad], dim=-1)
            batch_index = torch.full_like(batch_index, int(transform_batch))
        decoder_input = z
        if cont_covs is not None and self.n_continuous_cov > 0:
            if z.dim() != cont_covs.dim():
                cont_covs = cont_covs.unsqueeze(0).expand(z.size(0), -1, -1)
            decoder_input = torch.cat([z, cont_covs], dim=-1)
        offset = size_factor if (self.use_size_factor_key and size_factor is not None) else library
        px_scale, px_r, px_rate, px_dropout = self.decoder(
            self.dispersion, decoder_input, offset, batch_index, *self._cats(cat_covs)
        )
        if self.dispersion == "gene":
            px_r = self.px_r
        elif self.dispersion == "gene-batch":
            px_r = F.linear(_one_hot(batch_index, self.n_batch, self.px_r.dtype), self.px_r)
        elif self.dispersion == "gene-label":
            px_r = F.linear(_one_hot(y, self.n_label_codes, self.px_r.dtype), self.px_r)
        px_r = torch.exp(px_r)
        if self.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(mu=px_rate, theta=px_r, zi_logits=px_dropout, scale=px_scale)
        elif self.gene_likelihood == "nb":
            px = NegativeBinomial(mu=px_rate, theta=px_r, scale=px_scale)
        else:
            px = Poisson(rate=px_rate, scale=px_scale)
        pl = None
        if not self.use_observed_lib_size:
            means, variances = self._library_prior(batch_index)
            pl = Normal(means, variances.sqrt())
        pz = Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False)
        return {MODULE_KEYS.PX_KEY: px, MODULE_KEYS.PL_KEY: pl, MODULE_KEYS.PZ_KEY: pz}

    def _theta_for_loss(self, px) -> torch.Tensor:
        """The dispersion: gene-wise ``(G,)`` kept unbroadcast for ``dispersion='gene'``."""
        return torch.exp(self.px_r) if self.dispersion == "gene" else px.theta

    def _library_prior(self, batch_index):
        idx = batch_index.reshape(-1).long()
        return self.library_log_means.reshape(-1)[idx].unsqueeze(-1), self.library_log_vars.reshape(-1)[
            idx
        ].unsqueeze(-1)

    # -------------------------------------------------------------------- loss
    def _label_mask(self, y: torch.Tensor) -> torch.Tensor:
        if self.unlabeled_code is None:
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.unlabeled_code

    def label_classes(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labeled mask, class index)``: registry codes without the unlabeled code (0 for unlabeled cells)."""
        y = y.reshape(-1).long()
        labeled = self._label_mask(y)
        cls = y if self.unlabeled_code is None else y - (y > self.unlabeled_code).long()
        cls = torch.where(labeled, cls, torch.zeros_like(cls)).clamp(max=max(0, self.n_labels - 1))
        return labeled, cls

    def label_logits(self, z_l: torch.Tensor) -> torch.Tensor:
        return self.heads["label"](z_l)

    def batch_logits(self, z_b: torch.Tensor) -> torch.Tensor:
        return self.heads["batch"](z_b)

    def _labelled_logits(self, labelled_tensors, loc=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-head logits (posterior means of ``z_l``) and classes of a labelled minibatch.

        ``loc``: those posterior means when already computed (by the fused pass of :meth:`inference`;
        the standard normals the encoder call would draw are drawn and discarded, as there).
        """
        labeled, y = self.label_classes(labelled_tensors[REGISTRY_KEYS.LABELS_KEY])
        if loc is None:
            x_ = self._encoder_input(
                labelled_tensors[REGISTRY_KEYS.X_KEY], labelled_tensors.get(REGISTRY_KEYS.CONT_COVS_KEY)
            )
            cats = self._cats(labelled_tensors.get(REGISTRY_KEYS.CAT_COVS_KEY))
            loc = self.encoders["l"](x_, labelled_tensors[REGISTRY_KEYS.BATCH_KEY], *cats)[0].loc
        else:
            torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        return self.heads["label"](loc)[labeled], y[labeled]

    def loss(
        self,
        tensors,
        inference_outputs,
        generative_outputs,
        kl_weight: float = 1.0,
        labelled_tensors: dict[str, torch.Tensor] | None = None,
    ):
        """ELBO with conditional priors, supervised heads, adversaries and the cross-covariance penalty.

        ``labelled_tensors`` (a minibatch of labelled cells, from the semi-supervised loaders): the
        label head's cross-entropy is the mean over the labelled cells of both minibatches, so it
        sees a full minibatch of labels per step however few cells are labelled.
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        s = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()
        labeled, y_safe = self.label_classes(tensors[REGISTRY_KEYS.LABELS_KEY])

        px = generative_outputs[MODULE_KEYS.PX_KEY]
        if self.gene_likelihood == "zinb":
            reconst = -zinb_log_prob(x, px.mu, self._theta_for_loss(px), px.zi_logits).sum(-1)
        else:
            reconst = -px.log_prob(x).sum(-1)

        qb, ql_, qr = inference_outputs["qz_b"], inference_outputs["qz_l"], inference_outputs["qz_r"]
        zb, zl, zr = inference_outputs["z_b"], inference_outputs["z_l"], inference_outputs["z_r"]
        kl_b = _kl_unit_normal(qb.loc, qb.scale, self.prior_mean_b.T[s]).sum(-1)
        # the supervised heads read posterior means, as predict() does: on samples, the unit prior
        # noise hides a label signal the KL keeps small and the heads may never start learning
        label_logits = self.heads["label"](ql_.loc)
        # KL of z_l to every label component: (n, K)
        m_l = self.prior_mean_l.T  # (K, d_l)
        kl_l_all = 0.5 * ((ql_.loc.unsqueeze(1) - m_l.unsqueeze(0)).pow(2)).sum(-1) + (
            0.5 * (ql_.scale.pow(2) - 1.0) - torch.log(ql_.scale)
        ).sum(-1, keepdim=True)
        resp = F.softmax(label_logits.detach(), dim=-1)
        resp = torch.where(
            labeled.unsqueeze(-1), _one_hot(y_safe, max(1, self.n_labels), ql_.loc.dtype), resp
        )
        kl_l = (resp * kl_l_all).sum(-1)
        kl_r = _kl_unit_normal(qr.loc, qr.scale).sum(-1)
        kl_lib = torch.zeros_like(kl_r)
        if not self.use_observed_lib_size:
            kl_lib = kl(inference_outputs[MODULE_KEYS.QL_KEY], generative_outputs[MODULE_KEYS.PL_KEY]).sum(-1)
        kl_weighted = self.beta * (self.beta_b * kl_b + self.beta_l * kl_l + kl_r) + kl_lib
        elbo = torch.mean(reconst + kl_weight * kl_weighted)

        # supervised heads
        ce_b = _masked_ce(self.heads["batch"](qb.loc), s, None)
        if labelled_tensors is not None:
            extra_logits, extra_y = self._labelled_logits(
                labelled_tensors, inference_outputs.get("qz_l_labelled_loc")
            )
            ce_l = _masked_ce(
                torch.cat([label_logits[labeled], extra_logits]), torch.cat([y_safe[labeled], extra_y]), None
            )
        else:
            ce_l = _masked_ce(label_logits, y_safe, labeled)
        sup = self.lambda_b * ce_b + self.lambda_l * ce_l

        # adversaries: each head learns on detached latents; the encoder is pushed (scale alpha)
        # towards a head output that carries no information (uniform), through the frozen head
        adv_terms = {}
        adv_total = zb.new_zeros(())
        # The adversaries see posterior means (what users embed and probe; sampling noise would
        # hide a leak that a probe of the means still finds). z_b is centred within each batch,
        # z_l within each label and z_r over the minibatch (minibatch group means), then whitened
        # by the pooled within-group covariance (_group_whiten): the leak a probe finds is in the
        # small within-group variation, along any direction of it, and must be measured at its
        # own scale, neither drowned by the between-group spread nor by the block's largest
        # within-group direction. This is conditional independence (z_b of the label given the
        # batch, z_l of the batch given the label), so what batch composition implies about
        # labels stays allowed when batch and label are confounded.
        K, B = max(1, self.n_labels), self.n_batch
        y_all = torch.where(labeled, y_safe, resp.argmax(-1))
        # the one-hots of the groups, built once per step
        dt = qb.loc.dtype
        oh_s, oh_y = _one_hot(s, B, dt), _one_hot(y_all, K, dt)
        # the three blocks whitened in one stacked pass (zero-padded to a common width)
        dims = (self.n_latent_b, self.n_latent_l, self.n_latent_r)
        white = _group_whiten(
            _pad_columns(qb.loc, ql_.loc, qr.loc),
            _pad_columns(oh_s, oh_y, torch.ones_like(oh_s[:, :1])),
            self.whiten_ridge,
            self._block_dims,
        )
        mb, ml, mr = (white[i, :, :d] for i, d in enumerate(dims))
        # linear leakage is measured within each (label, batch) cell of the table: z_l must not
        # differ between batches within a label, nor z_b between labels within a batch. The spread
        # between (label, batch) cells is the spread of labels within batches for z_b (its batch
        # means are zero after whitening within batches) and of batches within labels for z_l.
        # "rl" reads the labelled cells only (where y_safe equals y_all), "rb" every cell.
        joint = y_all * B + s
        oh_joint = _one_hot(joint, K * B, dt)
        spread = dict(
            zip(
                ("bl", "lb", "rb", "rl"),
                _class_mean_spread(
                    torch.cat([white, white[2:]]),  # z_b, z_l, z_r, z_r
                    _pad_columns(oh_joint, oh_joint, oh_s, oh_y * labeled.unsqueeze(-1).to(dt)),
                ),
                strict=True,
            )
        )
        # and the part a nearest-neighbour probe reads, linear or not and at any scale: cells of one
        # label closer together inside their batch in z_b, of one batch inside their label in z_l
        # (kernel alignment within groups; on the batch-free z_r it did not help, see Notes). The
        # labels are y_all, the label head's prediction for unlabelled cells, as for the groups
        kern = {}
        if self.alpha_kernel > 0:
            # both measures in one stacked pass (z_b within batches, z_l within labels)
            leak = _kernel_leak(
                _pad_columns(qb.loc, ql_.loc), _pad_columns(oh_s, oh_y), _pad_columns(oh_y, oh_s)
            )
            kern = {"bl": leak[0], "lb": leak[1]}
        for key, head_name, z, target, mask in (
            ("bl", "adv_label_from_b", mb, y_safe, labeled),
            ("lb", "adv_batch_from_l", ml, s, None),
            ("rb", "adv_batch_from_r", mr, s, None),
            ("rl", "adv_label_from_r", mr, y_safe, labeled),
        ):
            head = self.heads[head_name]
            logits_p, logits_z = head.dual(z)
            ce = _masked_ce(logits_p, target, mask)
            gap = _uniform_gap(logits_z, mask)
            # plus the part of the leak no adversary can miss: differences between the class
            # means of the whitened block (what a linear probe exploits)
            gap = gap + spread[key]
            if key in kern:
                gap = gap + self.alpha_kernel * kern[key]
            adv_terms[key] = ce
            # the head's own loss is scaled too: it only reaches the head (detached input), and
            # keeps the adversary learning as fast as the encoders move despite Adam's eps
            adv_total = adv_total + self.adversary_scale * (
                ce + self._ADV_BOOST.get(key, 1.0) * self.alpha[key] * gap
            )
        # residual adversaries: z_r is the residual, so neither z_b nor z_l may predict it
        # the target is z_r standardised per column, not whitened: whitened, its near-empty
        # directions weigh as much as the residual program, and z_b took the program up (R^2 0.98)
        target_r = _standardise(qr.loc).detach()
        for key, head_name, z in (("br", "adv_res_from_b", mb), ("lr", "adv_res_from_l", ml)):
            head = self.heads[head_name]
            pred_p, pred = head.dual(z)
            mse = (pred_p - target_r).pow(2).mean()
            spread = (
                (pred - pred.mean(0, keepdim=True)).pow(2).mean() if pred.shape[0] > 1 else pred.sum() * 0.0
            )
            # and the linear part: squared correlations between the block and z_r
            spread = spread + (z.T @ target_r / max(1, z.shape[0] - 1)).pow(2).sum()
            adv_terms[key] = mse
            adv_total = adv_total + self.adversary_scale * (
                mse + self._RES_BOOST.get(key, 1.0) * self.alpha_res * spread
            )

        xcov = cross_covariance_penalty([zb, zl, zr])
        loss = elbo + sup + adv_total + self.gamma * xcov

        extra = {
            "elbo_loss": elbo.detach(),
            "sup_loss_b": ce_b.detach(),
            "sup_loss_l": ce_l.detach(),
            **{f"adv_loss_{k}": v.detach() for k, v in adv_terms.items()},
            "xcov_loss": xcov.detach(),
        }
        n_lab = int(labeled.sum())
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst,
            kl_local={"kl_b": kl_b, "kl_l": kl_l, "kl_r": kl_r, "kl_library": kl_lib},
            classification_loss=ce_l if n_lab > 0 else None,
            logits=label_logits[labeled] if n_lab > 0 else None,
            true_labels=y_safe[labeled] if n_lab > 0 else None,
            extra_metrics=extra,
        )

    # -------------------------------------------------------- scvi-tools extras
    @torch.inference_mode()
    def sample(self, tensors, n_samples: int = 1, max_poisson_rate: float = 1e8, generative_kwargs=None):
        """Posterior predictive samples, ``(n_obs, n_vars)`` or ``(n_obs, n_vars, n_samples)``."""
        from scvi.distributions import Poisson

        _, gen = self.forward(
            tensors,
            inference_kwargs={"n_samples": n_samples},
            generative_kwargs=generative_kwargs,
            compute_loss=False,
        )
        dist = gen[MODULE_KEYS.PX_KEY]
        if self.gene_likelihood == "poisson":
            dist = Poisson(torch.clamp(dist.rate, max=max_poisson_rate))
        samples = dist.sample()
        samples = torch.permute(samples, (1, 2, 0)) if n_samples > 1 else samples
        return samples.cpu()

    @torch.inference_mode()
    def marginal_ll(
        self, tensors, n_mc_samples: int, return_mean: bool = False, n_mc_samples_per_pass: int = 1
    ):
        """Importance-sampled log p(x) with the posterior as proposal (the priors as in the loss)."""
        s = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()
        labeled, y_safe = self.label_classes(tensors[REGISTRY_KEYS.LABELS_KEY])
        n_mc_samples_per_pass = max(1, min(n_mc_samples_per_pass, n_mc_samples))
        n_passes = math.ceil(n_mc_samples / n_mc_samples_per_pass)
        to_sum = []
        for _ in range(n_passes):
            inf, gen = self.forward(
                tensors, inference_kwargs={"n_samples": n_mc_samples_per_pass}, compute_loss=False
            )
            x = tensors[REGISTRY_KEYS.X_KEY]
            log_px = gen[MODULE_KEYS.PX_KEY].log_prob(x).sum(-1)
            zb, zl, zr = inf["z_b"], inf["z_l"], inf["z_r"]
            if zb.dim() == 2:
                zb, zl, zr, log_px = zb[None], zl[None], zr[None], log_px[None]
            log_pb = Normal(self.prior_mean_b.T[s], 1.0).log_prob(zb).sum(-1)
            # mixture over labels (uniform weights) for unlabeled cells, the own component otherwise
            lp = Normal(self.prior_mean_l.T, 1.0).log_prob(zl.unsqueeze(-2)).sum(-1)  # (S, n, K)
            own = lp.gather(-1, y_safe.expand(lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
            mix = torch.logsumexp(lp, -1) - math.log(lp.shape[-1])
            log_pl = torch.where(labeled, own, mix)
            log_pr = Normal(0.0, 1.0).log_prob(zr).sum(-1)
            log_q = (
                inf["qz_b"].log_prob(zb).sum(-1)
                + inf["qz_l"].log_prob(zl).sum(-1)
                + inf["qz_r"].log_prob(zr).sum(-1)
            )
            log_w = log_px + log_pb + log_pl + log_pr - log_q
            if not self.use_observed_lib_size:
                lib = inf[MODULE_KEYS.LIBRARY_KEY]
                lib = lib if lib.dim() == 3 else lib[None]
                means, variances = self._library_prior(s)
                log_w = log_w + Normal(means, variances.sqrt()).log_prob(lib).sum(-1)
                log_w = log_w - inf[MODULE_KEYS.QL_KEY].log_prob(lib).sum(-1)
            to_sum.append(log_w)
        log_w = torch.cat(to_sum, dim=0)
        log_lkl = torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
        return torch.mean(log_lkl).item() if return_mean else log_lkl
