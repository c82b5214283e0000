"""Building blocks of the SCAR module: the sparse softplus and the native + ambient count mixture."""

from __future__ import annotations

import math

import torch
from scvi.distributions._negative_binomial import log_nb_positive, log_zinb_positive
from torch import nn
from torch.distributions import Distribution, constraints

_EPS = 1e-8


def softplus_sp(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sparse softplus: ``max(0, softplus(x) - softplus(-10 (1 - sparsity)))``.

    The shift turns small activations into exact zeros, which is what makes the native
    frequencies sparse (sparsity 0.9 cuts at ``softplus(-1) = 0.313``).
    """
    return torch.relu(nn.functional.softplus(x) - math.log1p(math.exp(-10.0 * (1.0 - sparsity))))


class SparseSoftplus(nn.Module):
    """:func:`softplus_sp` as a layer."""

    def __init__(self, sparsity: float = 0.9):
        super().__init__()
        self.sparsity = float(sparsity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus_sp(x, self.sparsity)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}"


class AmbientMixture(Distribution):
    r"""Counts of a droplet: native expression plus ambient RNA.

    Each feature ``g`` of a cell is drawn with mixture probability
    :math:`p_g = (1 - \rho) f_g + \rho a_g` where ``f`` (``scale``) are the native frequencies
    (summing to 1), ``rho`` (``noise_ratio``) the contamination fraction of the cell and ``a``
    (``ambient``) the ambient profile. Subclasses give the count likelihood; all use the mean
    ``library * p``.

    Parameters
    ----------
    scale
        Native frequencies ``f``, shape ``(..., n_genes)``.
    noise_ratio
        Contamination fraction ``rho``, shape ``(..., 1)``.
    ambient
        Ambient profile of the cell's batch, broadcastable to ``scale``.
    library
        Library size, shape ``(..., 1)``: the exact observed total for the Binomial.

    Notes
    -----
    ``get_normalized("scale")`` returns the native frequencies (they sum to 1, so normalised
    expression and differential expression are not confounded by contamination);
    ``get_normalized("mu")`` returns them scaled to the library. Setting ``mu`` (as scvi-tools'
    importance weighting does to move a cell's distribution to another cell's library size) sets
    the library to ``mu.sum(-1)`` and keeps ``scale``, ``noise_ratio`` and ``ambient``.
    """

    arg_constraints = {
        "scale": constraints.greater_than_eq(0),
        "noise_ratio": constraints.unit_interval,
        "ambient": constraints.greater_than_eq(0),
        "library": constraints.greater_than_eq(0),
    }
    support = constraints.nonnegative_integer

    def __init__(self, scale, noise_ratio, ambient, library, validate_args: bool = False):
        self.scale = scale
        self.noise_ratio = noise_ratio
        self.ambient = ambient.expand_as(scale) if ambient.shape != scale.shape else ambient
        self.library = library
        super().__init__(batch_shape=scale.shape, validate_args=validate_args)

    # -- parameters ------------------------------------------------------------------------------
    @property
    def probs(self) -> torch.Tensor:
        """Mixture probability of each feature, ``(1 - rho) f + rho a``."""
        return torch.addcmul(self.noise_ratio * self.ambient, 1 - self.noise_ratio, self.scale)

    def log_prob_sum(self, value: torch.Tensor, log_comb_sum: torch.Tensor | None = None) -> torch.Tensor:
        """``log_prob(value)`` summed over features (what the loss needs; subclasses do it faster).

        ``log_comb_sum`` is the Binomial's precomputed per-cell constant; other likelihoods ignore it.
        """
        return self.log_prob(value).sum(-1)

    @property
    def mu(self) -> torch.Tensor:
        """Expected observed counts, ``library * probs``."""
        return self.library * self.probs

    @mu.setter
    def mu(self, value: torch.Tensor) -> None:
        self.library = value.sum(-1, keepdim=True)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def native_mean(self) -> torch.Tensor:
        """Expected native counts, ``library * (1 - rho) * f``."""
        return self.library * (1 - self.noise_ratio) * self.scale

    @property
    def ambient_mean(self) -> torch.Tensor:
        """Expected ambient counts, ``library * rho * a``."""
        return self.library * self.noise_ratio * self.ambient

    def get_normalized(self, key: str) -> torch.Tensor:
        if key == "scale":
            return self.scale
        if key == "mu":
            return self.library * self.scale
        raise ValueError(f"key must be 'scale' or 'mu', got {key!r}.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)})"


class LogFactorial:
    """``log(k!)`` of whole numbers by table lookup (float64 table, grown on demand).

    ``torch.lgamma`` costs more than the rest of the likelihood; counts are integers, so a
    lookup in a float64 table is exact to float32 and several times cheaper. The differences of
    large values (``log n! - log (n - x)!``) are taken in float64, so no precision is lost.
    """

    def __init__(self):
        self.table: torch.Tensor | None = None

    def _ensure(self, max_value: int, device) -> torch.Tensor:
        t = self.table
        if t is None or t.device != torch.device(device) or t.numel() <= max_value:
            size = max(int(max_value) + 1, 2 * (t.numel() if t is not None else 1024))
            t = torch.lgamma(torch.arange(1, size + 1, dtype=torch.float64, device=device))
            self.table = t
        return t

    def log_binomial_coefficient(self, n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log C(n, x)`` for integer-valued float tensors (``x <= n``), as float32."""
        with torch.no_grad():
            t = self._ensure(int(n.max().item()) if n.numel() else 0, n.device)
            ni = n.to(torch.int64)
            xi = torch.minimum(x.to(torch.int64), ni)
            return (t[ni] - t[xi] - t[ni - xi]).to(x.dtype)

    def log_factorial(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self._ensure(int(x.max().item()) if x.numel() else 0, x.device)
            return t[x.to(torch.int64)].to(x.dtype)


class _BinomialKernel(torch.autograd.Function):
    r"""``sum_g x_g log(p_g + eps) + (n - x_g) log(1 - p_g + eps)`` per cell, with a hand-written gradient.

    The same value as the composed tensor expression, but the backward pass is one fused
    expression ``x / (p + eps) - (n - x) / (1 - p + eps)`` instead of autograd's chain of
    element-wise nodes over the ``(cells, genes)`` matrix (a large part of a SCAR step).
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        lq = torch.log1p(torch.neg(p).add_(_EPS))
        lpq = torch.log(p + _EPS).sub_(lq)
        # sum_g x log p + (n - x) log(1 - p) = sum_g x (log p - log(1 - p)) + n sum_g log(1 - p)
        out = (x * lpq).sum(-1) + n[..., 0] * lq.sum(-1)
        ctx.save_for_backward(p, x, n)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, x, n = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        d = x / (p + _EPS)
        d.sub_((n - x).div_(torch.neg(p).add_(1.0 + _EPS)))
        return d.mul_(grad.unsqueeze(-1)), None, None


class AmbientBinomial(AmbientMixture):
    """Per-feature Binomial with the exact integer library as total count."""

    log_factorial: LogFactorial | None = None  # set by the module for table lookups

    def _log_comb(self, value: torch.Tensor) -> torch.Tensor:
        n = self.library
        if self.log_factorial is not None:
            return self.log_factorial.log_binomial_coefficient(n, value)
        return torch.lgamma(n + 1) - torch.lgamma(value + 1) - torch.lgamma((n - value).clamp_min(0) + 1)

    def _logs(self):
        p = self.probs
        return torch.log(p + _EPS), torch.log1p(torch.neg(p).add_(_EPS))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp, lq = self._logs()
        # the normalising constant depends on the data only (no gradient flows through it)
        return self._log_comb(value) + value * lp + (self.library - value) * lq

    def log_prob_sum(self, value: torch.Tensor, log_comb_sum: torch.Tensor | None = None) -> torch.Tensor:
        """``log_prob(value)`` summed over features.

        ``log_comb_sum``, shape ``(n_cells, 1)`` or ``(n_cells,)``: the data-only constant
        ``sum_g log C(n, x_g)`` of each cell when precomputed (SCAR registers it at setup), so the
        step does not evaluate it per feature; computed here otherwise.
        """
        const = self._log_comb(value).sum(-1) if log_comb_sum is None else log_comb_sum.reshape(value.shape[-2])
        return _BinomialKernel.apply(self.probs, value, self.library) + const

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            p = self.probs.clamp(0, 1)
            n = self.library.expand_as(p)
            d = torch.distributions.Binomial(total_count=n, probs=p, validate_args=False)
            return d.sample(sample_shape)


class AmbientPoisson(AmbientMixture):
    """Per-feature Poisson with mean ``library * probs``."""

    log_factorial: LogFactorial | None = None  # set by the module for table lookups

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        mu = self.mu
        lf = self.log_factorial.log_factorial(value) if self.log_factorial is not None else torch.lgamma(value + 1)
        return value * torch.log(mu + _EPS) - mu - lf

    def log_prob_sum(self, value: torch.Tensor, log_comb_sum: torch.Tensor | None = None) -> torch.Tensor:
        # sum_g mu_g = library (probs sum to 1): no need to materialise the sum of mu
        lf = self.log_factorial.log_factorial(value) if self.log_factorial is not None else torch.lgamma(value + 1)
        return (value * torch.log(self.mu + _EPS) - lf).sum(-1) - self.library[..., 0] * self.probs.sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            rate = self.mu.expand(torch.Size(sample_shape) + self.batch_shape)
            return torch.poisson(rate)


class AmbientNegativeBinomial(AmbientMixture):
    """Negative binomial with mean ``library * probs`` and per-gene inverse dispersion ``theta``."""

    arg_constraints = {**AmbientMixture.arg_constraints, "theta": constraints.greater_than(0)}

    def __init__(self, scale, noise_ratio, ambient, library, theta, validate_args: bool = False):
        super().__init__(scale, noise_ratio, ambient, library, validate_args=validate_args)
        self.theta = theta.expand_as(scale) if theta.shape != scale.shape else theta

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_nb_positive(value, self.mu, self.theta, eps=_EPS)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            mu, theta = self.mu.expand(shape), self.theta.expand(shape)
            rate = torch.distributions.Gamma(theta, theta / (mu + _EPS), validate_args=False).sample()
            return torch.poisson(rate)


class AmbientZeroInflatedNegativeBinomial(AmbientNegativeBinomial):
    """Zero-inflated negative binomial (per cell and gene dropout logits ``zi_logits``)."""

    arg_constraints = {**AmbientNegativeBinomial.arg_constraints, "zi_logits": constraints.real}

    def __init__(self, scale, noise_ratio, ambient, library, theta, zi_logits, validate_args: bool = False):
        super().__init__(scale, noise_ratio, ambient, library, theta, validate_args=validate_args)
        self.zi_logits = zi_logits

    @property
    def zi_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.zi_probs) * self.mu

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits, eps=_EPS)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            counts = super().sample(sample_shape)
            keep = torch.rand_like(counts) >= self.zi_probs.expand_as(counts)
            return counts * keep


LIKELIHOODS: dict[str, type[AmbientMixture]] = {
    "b": AmbientBinomial,
    "poisson": AmbientPoisson,
    "nb": AmbientNegativeBinomial,
    "zinb": AmbientZeroInflatedNegativeBinomial,
}
