"""Spliced / unspliced counts along switching-ODE trajectories, with the kinetics kept as ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse as sp_sparse

STATE_NAMES = ("induction", "induction_steady", "repression", "repression_steady")


def _exp_diff(a, b, t):
    """``(exp(-a t) - exp(-b t)) / (b - a)``, exact in the limit ``a -> b`` (where it is ``t exp(-a t)``)."""
    d = b - a
    small = np.abs(d) < 1e-8
    safe = np.where(small, 1.0, d)
    return np.exp(-a * t) * np.where(small, t, -np.expm1(-d * t) / safe)


def _switching_ode(t, alpha, beta, gamma, t_switch):
    """Noise-free ``(u, s)`` of the on/off switching model at times ``t`` (cells x genes, broadcast)."""
    t_on = np.minimum(t, t_switch)
    u_on = alpha / beta * -np.expm1(-beta * t_on)
    s_on = alpha / gamma * -np.expm1(-gamma * t_on) - alpha * _exp_diff(gamma, beta, t_on)
    u0 = alpha / beta * -np.expm1(-beta * t_switch)
    s0 = alpha / gamma * -np.expm1(-gamma * t_switch) - alpha * _exp_diff(gamma, beta, t_switch)
    tau = np.maximum(t - t_switch, 0.0)
    u_off = u0 * np.exp(-beta * tau)
    s_off = s0 * np.exp(-gamma * tau) + beta * u0 * _exp_diff(gamma, beta, tau)
    on = t <= t_switch
    return np.where(on, u_on, u_off), np.where(on, s_on, s_off), u0, s0


def simulate_velocity(
    n_obs: int = 1000,
    n_vars: int = 50,
    seed: int = 0,
    t_max: float = 20.0,
    switch_range: tuple[float, float] = (0.3, 0.7),
    beta_range: tuple[float, float] = (0.3, 1.5),
    gamma_range: tuple[float, float] = (0.1, 0.6),
    u_steady_range: tuple[float, float] = (4.0, 30.0),
    size_factor_sd: float = 0.1,
    n_cell_types: int = 4,
    sparse: bool = False,
):
    """Simulate spliced and unspliced counts of cells along one switching-ODE trajectory per gene.

    Every cell has one true time :math:`t_c \\sim U(0, t_{max})`, shared by all genes. Gene :math:`g` follows
    the on/off kinetics of scVelo and veloVI,

    .. math::
        \\frac{du}{dt} = \\alpha_g \\mathbb{1}[t \\le t^s_g] - \\beta_g u, \\qquad
        \\frac{ds}{dt} = \\beta_g u - \\gamma_g s, \\qquad u(0) = s(0) = 0,

    with transcription switched off at :math:`t^s_g`. The noise-free abundances are scaled by a
    log-normal size factor per cell and observed as Poisson counts.

    Parameters
    ----------
    n_obs
        Number of cells.
    n_vars
        Number of genes.
    seed
        Seed of the random generator; the same arguments give the same data.
    t_max
        Largest true time.
    switch_range
        Switch times :math:`t^s_g` are drawn uniformly in ``switch_range`` times ``t_max``.
    beta_range
        Splicing rates :math:`\\beta_g` are drawn log-uniformly in this range.
    gamma_range
        Degradation rates :math:`\\gamma_g` are drawn log-uniformly in this range.
    u_steady_range
        Unspliced steady states :math:`\\alpha_g / \\beta_g` (expected counts) are drawn log-uniformly here.
    size_factor_sd
        Standard deviation of the log size factor per cell (0 for none).
    n_cell_types
        Number of cell types in ``obs['cell_type']``: consecutive, equally long windows of true time.
    sparse
        Store the count layers as CSR sparse matrices.

    Returns
    -------
    AnnData with

    - ``layers['spliced']``, ``layers['unspliced']`` and ``X`` (= spliced): the observed counts;
    - ``layers['true_spliced']``, ``layers['true_unspliced']``: noise-free abundances (before size factors);
    - ``layers['true_velocity']`` (:math:`ds/dt`) and ``layers['true_velocity_u']`` (:math:`du/dt`) at the
      true time, in the units of ``true_spliced`` / ``true_unspliced``;
    - ``layers['true_state']`` (int8): 0 induction, 1 induction steady state (within 5% of it), 2 repression,
      3 repression steady state (within 5% of zero);
    - ``obs['true_time']``, ``obs['size_factor']``, ``obs['cell_type']`` (categorical);
    - ``var['true_alpha']``, ``var['true_beta']``, ``var['true_gamma']``, ``var['true_t_switch']``;
    - ``uns['simulate_velocity']``: the arguments.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate_velocity(n_obs=200, n_vars=10, seed=0)
    >>> adata.layers["spliced"].shape
    (200, 10)
    >>> bool((adata.layers["true_velocity"] > 0).any() and (adata.layers["true_velocity"] < 0).any())
    True
    """
    import anndata as ad

    for name, value in (("n_obs", n_obs), ("n_vars", n_vars), ("n_cell_types", n_cell_types)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if not t_max > 0:
        raise ValueError(f"t_max must be > 0, got {t_max!r}.")
    for name, (lo, hi) in (
        ("switch_range", switch_range),
        ("beta_range", beta_range),
        ("gamma_range", gamma_range),
        ("u_steady_range", u_steady_range),
    ):
        if not (0 < lo <= hi):
            raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)!r}.")
    if switch_range[1] > 1:
        raise ValueError(f"switch_range must lie in (0, 1] (fractions of t_max), got {switch_range!r}.")
    if size_factor_sd < 0:
        raise ValueError(f"size_factor_sd must be >= 0, got {size_factor_sd!r}.")

    rng = np.random.default_rng(seed)

    def log_uniform(lo, hi, n):
        return np.exp(rng.uniform(np.log(lo), np.log(hi), n))

    t = rng.uniform(0.0, t_max, n_obs)
    beta = log_uniform(*beta_range, n_vars)
    gamma = log_uniform(*gamma_range, n_vars)
    alpha = beta * log_uniform(*u_steady_range, n_vars)
    t_switch = rng.uniform(switch_range[0] * t_max, switch_range[1] * t_max, n_vars)

    tc = t[:, None]
    u, s, u0, s0 = _switching_ode(tc, alpha, beta, gamma, t_switch)
    on = tc <= t_switch
    velocity_u = np.where(on, alpha, 0.0) - beta * u
    velocity_s = beta * u - gamma * s

    state = np.where(on, 0, 2).astype(np.int8)
    state[on & (u >= 0.95 * alpha / beta) & (s >= 0.95 * alpha / gamma)] = 1
    state[~on & (u <= 0.05 * u0) & (s <= 0.05 * s0)] = 3

    size_factor = np.exp(rng.normal(0.0, size_factor_sd, n_obs)) if size_factor_sd > 0 else np.ones(n_obs)
    spliced = rng.poisson(s * size_factor[:, None]).astype(np.float32)
    unspliced = rng.poisson(u * size_factor[:, None]).astype(np.float32)
    if sparse:
        spliced, unspliced = sp_sparse.csr_matrix(spliced), sp_sparse.csr_matrix(unspliced)

    edges = np.linspace(0.0, t_max, n_cell_types + 1)[1:-1]
    types = [f"type_{i}" for i in range(n_cell_types)]
    cell_type = pd.Categorical.from_codes(np.searchsorted(edges, t, side="right"), categories=types)

    obs_names = [f"cell_{i}" for i in range(n_obs)]
    var_names = [f"gene_{g}" for g in range(n_vars)]
    obs = pd.DataFrame(
        {"true_time": t, "size_factor": size_factor, "cell_type": cell_type},
        index=pd.Index(obs_names),
    )
    var = pd.DataFrame(
        {"true_alpha": alpha, "true_beta": beta, "true_gamma": gamma, "true_t_switch": t_switch},
        index=pd.Index(var_names),
    )
    adata = ad.AnnData(
        X=spliced.copy(),
        obs=obs,
        var=var,
        layers={
            "spliced": spliced,
            "unspliced": unspliced,
            "true_spliced": s.astype(np.float32),
            "true_unspliced": u.astype(np.float32),
            "true_velocity": velocity_s.astype(np.float32),
            "true_velocity_u": velocity_u.astype(np.float32),
            "true_state": state,
        },
    )
    adata.uns["simulate_velocity"] = {
        "n_obs": int(n_obs),
        "n_vars": int(n_vars),
        "seed": int(seed),
        "t_max": float(t_max),
        "switch_range": list(switch_range),
        "beta_range": list(beta_range),
        "gamma_range": list(gamma_range),
        "u_steady_range": list(u_steady_range),
        "size_factor_sd": float(size_factor_sd),
        "n_cell_types": int(n_cell_types),
        "state_names": list(STATE_NAMES),
    }
    return adata
