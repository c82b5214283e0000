"""Multi-batch data with cell types, a residual program and covariates, with known truth (for :class:`cellvi.FADVI`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse


def _check_int(value, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def simulate_batches(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_batches: int = 3,
    n_labels: int = 5,
    unlabeled_fraction: float = 0.3,
    unlabeled_category: str = "Unknown",
    batch_effect: float = 0.8,
    label_effect: float = 2.0,
    residual_effect: float = 1.2,
    composition_concentration: float | None = 6.0,
    covariates: bool = False,
    depth: float = 2000.0,
    dispersion: float = 5.0,
    seed: int = 0,
):
    """Simulate counts from several batches with cell types, a residual program and covariates.

    Every cell has a batch ``s``, a cell type ``y`` and a residual score ``r``. Its expected
    expression on the log scale is a sum of independent parts::

        log mu_g = base_g + label_effect * M[y, g] + batch_effect * B[s, g]
                   + residual_effect * r * W_g (+ covariate effects) + log(library)

    ``M`` gives every type its own up-regulated marker genes, ``B`` shifts a random half of the genes
    per batch (and every batch has its own sequencing depth), and ``W`` loads the residual program on
    its own gene set. ``r ~ N(0, 1)`` is drawn independently of batch and type (a continuous
    program such as cell cycle or activation), so it is neither a batch nor a label effect. Batches
    differ in their type composition (as real batches do), which is what makes batch and label
    partly confounded. Counts are negative binomial around ``mu``. A random ``unlabeled_fraction``
    of the cells has its observed label replaced by ``unlabeled_category``.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes (at least 20).
    n_batches
        Number of batches (``1`` gives a single batch).
    n_labels
        Number of cell types (at least 2).
    unlabeled_fraction
        Fraction of cells whose observed label is ``unlabeled_category``, in [0, 1).
    unlabeled_category
        The category written to ``obs["labels"]`` for unlabeled cells.
    batch_effect
        Scale of the per-batch gene-wise log-fold changes.
    label_effect
        Log-fold change of a type's marker genes.
    residual_effect
        Log-fold change per unit of the residual score on the residual program's genes.
    composition_concentration
        Dirichlet concentration of the per-batch type composition: small values make batches differ
        strongly in composition (batch and label confounded), ``None`` gives every batch the same
        (uniform) composition.
    covariates
        If True, add a categorical covariate ``obs["protocol"]`` (two levels, independent of batch,
        with its own effect on a few genes) and a continuous covariate ``obs["pct_mito"]`` (with its
        own effect on a few genes).
    depth
        Median library size.
    dispersion
        Inverse dispersion ``theta`` of the negative binomial (larger is closer to Poisson).
    seed
        Seed of the random number generator; the same seed gives the same data.

    Returns
    -------
    adata
        ``X`` the integer counts (CSR, float32) and ``layers["counts"]`` the same matrix;
        ``obs["batch"]`` (``"batch_0"``, ...), ``obs["cell_type"]`` (the true type of every cell),
        ``obs["labels"]`` (the observed labels, ``unlabeled_category`` for unlabeled cells),
        ``obs["is_labeled"]``, ``obs["residual"]`` (the true ``r``), ``obs["library_size"]``
        and, with ``covariates=True``, ``obs["protocol"]`` and ``obs["pct_mito"]``. The truth:
        ``layers["log_mean_batch_free"]`` (``log mu`` without the batch and library terms, float32),
        ``varm["batch_effect"]`` (genes x batches, the log-fold changes ``batch_effect * B.T``),
        ``var["marker_of"]`` (the type whose marker a gene is, ``""`` if none),
        ``var["residual_gene"]`` and ``var["residual_loading"]``, and ``uns["simulate_batches"]``
        (the arguments).

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate_batches(n_cells=300, n_genes=100, seed=0)
    >>> adata.shape
    (300, 100)
    >>> sorted(adata.obs["batch"].unique())
    ['batch_0', 'batch_1', 'batch_2']
    >>> bool((adata.obs["labels"] == "Unknown").mean() > 0.2)
    True
    """
    n_cells = _check_int(n_cells, "n_cells", 2)
    n_genes = _check_int(n_genes, "n_genes", 20)
    n_batches = _check_int(n_batches, "n_batches", 1)
    n_labels = _check_int(n_labels, "n_labels", 2)
    if not isinstance(unlabeled_fraction, (int, float)) or not 0 <= unlabeled_fraction < 1:
        raise ValueError(f"unlabeled_fraction must be a number in [0, 1), got {unlabeled_fraction!r}.")
    for name, value in (("batch_effect", batch_effect), ("label_effect", label_effect),
                        ("residual_effect", residual_effect)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    if not depth > 0:
        raise ValueError(f"depth must be > 0, got {depth!r}.")
    if not dispersion > 0:
        raise ValueError(f"dispersion must be > 0, got {dispersion!r}.")

    rng = np.random.default_rng(seed)
    G, K, B = n_genes, n_labels, n_batches

    # batches of similar size, each with its own type composition
    batch = np.sort(rng.integers(0, B, size=n_cells))
    if composition_concentration is None:
        composition = np.full((B, K), 1.0 / K)
    elif not composition_concentration > 0:
        raise ValueError(f"composition_concentration must be > 0 or None, got {composition_concentration!r}.")
    else:
        composition = rng.dirichlet(np.full(K, float(composition_concentration)), size=B)  # (B, K)
    u = rng.random(n_cells)
    labels = (u[:, None] > np.cumsum(composition[batch], axis=1)).sum(1).clip(max=K - 1)
    residual = rng.standard_normal(n_cells)

    base = rng.normal(0.0, 1.0, size=G) - 1.0
    # marker genes: the first 60 % of genes are split among the types
    n_marker = max(K, int(0.6 * G)) // K
    marker_of = np.full(G, -1)
    markers = np.zeros((K, G))
    for k in range(K):
        idx = np.arange(k * n_marker, (k + 1) * n_marker)
        marker_of[idx] = k
        markers[k, idx] = rng.uniform(0.6, 1.0, size=idx.size)
    # residual program: a gene set disjoint from the markers
    rest = np.arange(K * n_marker, G)
    res_genes = rest[: max(5, rest.size // 2)]
    loading = np.zeros(G)
    loading[res_genes] = rng.choice([-1.0, 1.0], size=res_genes.size) * rng.uniform(0.6, 1.0, size=res_genes.size)
    # batch effects on a random half of the genes (centred over batches)
    beff = rng.standard_normal((B, G)) * (rng.random((B, G)) < 0.5)
    if B > 1:
        beff -= beff.mean(0, keepdims=True)
    else:
        beff[:] = 0.0
    batch_lfc = batch_effect * beff  # (B, G)

    log_mean_free = base[None, :] + label_effect * markers[labels] + residual_effect * residual[:, None] * loading[None, :]
    obs_extra = {}
    if covariates:
        protocol = rng.integers(0, 2, size=n_cells)
        pct_mito = rng.gamma(4.0, 1.0, size=n_cells)
        cov_genes = rng.choice(G, size=max(2, G // 20), replace=False)
        cov_eff = np.zeros(G)
        cov_eff[cov_genes] = rng.choice([-0.8, 0.8], size=cov_genes.size)
        mito_genes = rng.choice(G, size=max(2, G // 20), replace=False)
        mito_eff = np.zeros(G)
        mito_eff[mito_genes] = 0.15
        log_mean_free = log_mean_free + protocol[:, None] * cov_eff + (pct_mito - 4.0)[:, None] * mito_eff
        obs_extra["protocol"] = pd.Categorical(np.where(protocol == 1, "B", "A"), categories=["A", "B"])
        obs_extra["pct_mito"] = pct_mito.astype(np.float32)

    batch_depth = depth * rng.uniform(0.6, 1.4, size=B)
    if B == 1:
        batch_depth[:] = depth
    lib = rng.lognormal(np.log(batch_depth[batch]), 0.3)
    logits = log_mean_free + batch_lfc[batch]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    mu = lib[:, None] * p
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion))
    empty = counts.sum(1) == 0
    counts[empty, rng.integers(0, G, size=int(empty.sum()))] = 1  # no empty cells

    X = sparse.csr_matrix(counts.astype(np.float32))
    unlabeled = rng.random(n_cells) < unlabeled_fraction
    type_names = [f"type_{k}" for k in range(K)]
    cell_type = np.asarray(type_names, dtype=object)[labels]
    observed = np.where(unlabeled, unlabeled_category, cell_type)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"batch_{b}" for b in batch], categories=[f"batch_{b}" for b in range(B)]),
            "cell_type": pd.Categorical(cell_type, categories=type_names),
            "labels": pd.Categorical(observed, categories=[*type_names, unlabeled_category]),
            "is_labeled": ~unlabeled,
            "residual": residual.astype(np.float32),
            "library_size": np.asarray(counts.sum(1), dtype=np.float32),
            **obs_extra,
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(
        {
            "marker_of": np.where(marker_of >= 0, np.asarray(type_names + [""], dtype=object)[marker_of], ""),
            "residual_gene": loading != 0,
            "residual_loading": loading.astype(np.float32),
        },
        index=pd.Index([f"gene_{j}" for j in range(G)]),
    )
    import anndata as ad

    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.layers["log_mean_batch_free"] = log_mean_free.astype(np.float32)
    adata.varm["batch_effect"] = batch_lfc.T.astype(np.float32)
    adata.uns["simulate_batches"] = {
        "n_cells": n_cells, "n_genes": n_genes, "n_batches": n_batches, "n_labels": n_labels,
        "unlabeled_fraction": float(unlabeled_fraction), "unlabeled_category": unlabeled_category,
        "batch_effect": float(batch_effect), "label_effect": float(label_effect),
        "residual_effect": float(residual_effect),
        "composition_concentration": None if composition_concentration is None else float(composition_concentration),
        "covariates": bool(covariates), "depth": float(depth),
        "dispersion": float(dispersion), "seed": seed if seed is None else int(seed),
    }
    return adata
