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
        return self.scale + self.noise_ratio * (self.ambient - self.scale)

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


class AmbientBinomial(AmbientMixture):
    """Per-feature Binomial with the exact integer library as total count."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        n = self.library
        p = self.probs
        # the normalising constant depends on the data only (no gradient flows through it)
        log_comb = torch.lgamma(n + 1) - torch.lgamma(value + 1) - torch.lgamma((n - value).clamp_min(0) + 1)
        return log_comb + value * torch.log(p + _EPS) + (n - value) * torch.log1p(-p + _EPS)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            p = self.probs.clamp(0, 1)
            n = self.library.expand_as(p)
            d = torch.distributions.Binomial(total_count=n, probs=p, validate_args=False)
            return d.sample(sample_shape)


class AmbientPoisson(AmbientMixture):
    """Per-feature Poisson with mean ``library * probs``."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        mu = self.mu
        return value * torch.log(mu + _EPS) - mu - torch.lgamma(value + 1)

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
