"""Droplet data with ambient RNA contamination and known ground truth (for :class:`cellvi.SCAR`)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from scipy import sparse


def simulate_ambient(
    n_cells: int = 2000,
    n_genes: int = 1000,
    n_types: int = 5,
    n_empty: int = 20000,
    n_damaged: int = 200,
    n_batches: int = 1,
    contamination: float = 0.15,
    native_depth: float = 1500.0,
    empty_depth: float = 25.0,
    modality: Literal["rna", "guides"] = "rna",
    seed: int = 0,
):
    """Simulate droplet data contaminated by ambient RNA, with the truth kept beside it.

    Cells of ``n_types`` types each express a sparse native program (a type expresses only part
    of the genes, with type-specific markers). Ambient RNA is the pooled content of lysed cells,
    so the ambient profile is a mixture of the type programs (weighted by abundance and a per-type
    lysis rate), not independent of them. Every cell receives a fraction ``rho_c`` of its counts
    from the ambient pool, drawn per cell around ``contamination``. The raw droplet matrix holds the
    cells, ``n_empty`` low-count empty droplets (ambient only) and ``n_damaged`` damaged-cell droplets
    (a fraction of one type's program plus ambient, at intermediate depth), as a droplet caller
    would see them before filtering.

    With ``modality="guides"`` the features are CRISPR guides (or hashtags): every cell carries one
    guide (a few carry two, a few none), its native counts all fall on that guide, and the ambient
    pool holds all guides in proportion to their frequency.

    Parameters
    ----------
    n_cells
        Number of cells (rows of the filtered matrix).
    n_genes
        Number of genes (or guides / tags when ``modality="guides"``).
    n_types
        Number of cell types (ignored for ``modality="guides"``).
    n_empty
        Number of empty droplets in the raw matrix.
    n_damaged
        Number of damaged-cell droplets in the raw matrix (not among the cells).
    n_batches
        Number of batches (channels). Each has its own ambient profile (other lysis rates) and its
        own mean contamination.
    contamination
        Mean per-cell contamination fraction ``rho_c`` (the expected fraction of a cell's counts
        that are ambient), in (0, 1).
    native_depth
        Median number of native counts per cell.
    empty_depth
        Median number of counts per empty droplet.
    modality
        ``"rna"`` for gene expression, ``"guides"`` for guide or hashtag counts.
    seed
        Seed of the random number generator; the same seed gives the same data.

    Returns
    -------
    adata
        Filtered cells: ``X`` the observed integer counts (CSR, float32), ``layers["native"]`` the
        true native counts and ``layers["ambient"]`` the true ambient counts (``X = native + ambient``),
        ``obs["cell_type"]`` (or ``obs["guide"]``: the assigned guide, ``""`` for none,
        ``"g1+g2"`` for two), ``obs["batch"]``, ``obs["contamination"]`` (the true ``rho_c``),
        ``obs["ambient_fraction"]`` (the realised fraction ambient / observed), ``varm["ambient_profile_true"]``
        (genes x batches, each column sums to 1) and ``uns["simulate_ambient"]`` (the arguments).
    raw_adata
        All droplets (cells first, then empty, then damaged), with ``obs["droplet_type"]`` in
        ``{"cell", "empty", "damaged"}`` and ``obs["batch"]``; the same genes as ``adata``.

    Examples
    --------
    >>> import cellvi
    >>> adata, raw = cellvi.data.simulate_ambient(n_cells=300, n_genes=200, n_empty=2000, seed=0)
    >>> adata.shape, raw.n_obs
    ((300, 200), 2500)
    >>> bool((adata.X - adata.layers["native"] - adata.layers["ambient"]).nnz == 0)
    True
    """
    _check_int(n_cells, "n_cells", 1)
    _check_int(n_genes, "n_genes", 2)
    _check_int(n_types, "n_types", 1)
    _check_int(n_empty, "n_empty", 0)
    _check_int(n_damaged, "n_damaged", 0)
    _check_int(n_batches, "n_batches", 1)
    if not 0 < contamination < 1:
        raise ValueError(f"contamination must be in (0, 1), got {contamination!r}.")
    if not native_depth > 0:
        raise ValueError(f"native_depth must be > 0, got {native_depth!r}.")
    if not empty_depth > 0:
        raise ValueError(f"empty_depth must be > 0, got {empty_depth!r}.")
    if modality not in ("rna", "guides"):
        raise ValueError(f"modality must be 'rna' or 'guides', got {modality!r}.")

    rng = np.random.default_rng(seed)
    G = n_genes
    batch = rng.integers(0, n_batches, size=n_cells)
    batch.sort()

    if modality == "rna":
        programs = _type_programs(rng, n_types, G)  # (K, G), rows sum to 1, sparse
        type_freq = rng.dirichlet(np.full(n_types, 4.0))
        labels = rng.choice(n_types, size=n_cells, p=type_freq)
        # per-cell biological variation around the type program (keeps the zeros)
        f = programs[labels] * rng.gamma(8.0, 1 / 8.0, size=(n_cells, G))
        f /= f.sum(1, keepdims=True)
        # ambient: lysed cells, per-batch lysis rates
        ambient = np.empty((n_batches, G))
        for b in range(n_batches):
            lysis = rng.gamma(2.0, 0.5, size=n_types)
            w = type_freq * lysis
            ambient[b] = (w / w.sum()) @ programs
        obs_label = pd.Categorical([f"type_{k}" for k in labels], categories=[f"type_{k}" for k in range(n_types)])
    else:
        names = [f"g{j}" for j in range(G)]
        guide_freq = rng.dirichlet(np.full(G, 5.0))
        first = rng.choice(G, size=n_cells, p=guide_freq)
        n_guides = rng.choice([0, 1, 2], size=n_cells, p=[0.05, 0.85, 0.10])
        second = (first + rng.integers(1, G, size=n_cells)) % G
        f = np.zeros((n_cells, G))
        rows = np.arange(n_cells)
        f[rows, first] = 1.0
        two = n_guides == 2
        f[rows[two], first[two]] = 0.5
        f[rows[two], second[two]] = 0.5
        none = n_guides == 0
        f[none] = 0.0
        ambient = np.tile(guide_freq, (n_batches, 1))
        for b in range(1, n_batches):
            ambient[b] = rng.dirichlet(guide_freq * 200.0)
        obs_label = np.array(
            [
                "" if k == 0 else (names[a] if k == 1 else "+".join(sorted((names[a], names[c]))))
                for a, c, k in zip(first, second, n_guides, strict=True)
            ],
            dtype=object,
        )

    # per-cell contamination: Beta around the batch mean (batches differ)
    batch_mean = np.clip(contamination * rng.uniform(0.7, 1.3, size=n_batches), 0.01, 0.9)
    if n_batches == 1:
        batch_mean[:] = contamination
    kappa = 12.0
    rho = rng.beta(batch_mean[batch] * kappa, (1 - batch_mean[batch]) * kappa)
    rho = np.clip(rho, 0.005, 0.95)
    n_native = np.maximum(rng.lognormal(np.log(native_depth), 0.35, size=n_cells), 20.0)
    if modality == "guides":
        # guide-less cells still have a library of ambient counts
        n_native = np.where(f.sum(1) > 0, n_native, 0.0)
    native = rng.poisson(n_native[:, None] * f)
    amb_rate = np.where(n_native > 0, n_native * rho / (1 - rho), native_depth * 0.05)
    amb = rng.poisson(amb_rate[:, None] * ambient[batch])
    observed = native + amb
    if modality == "guides":
        rho = np.where(n_native > 0, rho, 1.0)  # guide-less cells hold ambient counts only
    # every cell must have at least one count: add one ambient count where empty
    empty_rows = np.flatnonzero(observed.sum(1) == 0)
    if empty_rows.size:
        g = np.array([rng.choice(G, p=ambient[batch[i]]) for i in empty_rows])
        amb[empty_rows, g] += 1
        observed[empty_rows, g] += 1

    var_names = (
        pd.Index([f"gene_{j}" for j in range(G)]) if modality == "rna" else pd.Index([f"g{j}" for j in range(G)])
    )
    cell_names = pd.Index([f"cell_{i}" for i in range(n_cells)])
    batch_cats = [f"batch_{b}" for b in range(n_batches)]

    import anndata as ad

    obs = pd.DataFrame(index=cell_names)
    if modality == "rna":
        obs["cell_type"] = obs_label
    else:
        obs["guide"] = obs_label
    obs["batch"] = pd.Categorical([batch_cats[b] for b in batch], categories=batch_cats)
    obs["contamination"] = rho.astype(np.float64)
    tot = observed.sum(1)
    obs["ambient_fraction"] = amb.sum(1) / np.maximum(tot, 1)
    adata = ad.AnnData(
        X=sparse.csr_matrix(observed.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=var_names),
    )
    adata.layers["native"] = sparse.csr_matrix(native.astype(np.float32))
    adata.layers["ambient"] = sparse.csr_matrix(amb.astype(np.float32))
    adata.varm["ambient_profile_true"] = ambient.T.copy()
    adata.uns["simulate_ambient"] = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_types": n_types,
        "n_empty": n_empty,
        "n_damaged": n_damaged,
        "n_batches": n_batches,
        "contamination": contamination,
        "native_depth": native_depth,
        "empty_depth": empty_depth,
        "modality": modality,
        "seed": seed,
        "batches": batch_cats,
    }

    # empty droplets: ambient only, low depth
    e_batch = np.sort(rng.integers(0, n_batches, size=n_empty))
    e_depth = rng.lognormal(np.log(empty_depth), 0.8, size=n_empty)
    empties = _sample_sparse_profiles(rng, rng.poisson(e_depth), ambient, e_batch, G)
    # damaged cells: part of one cell's program plus a lot of ambient, intermediate depth
    d_batch = rng.integers(0, n_batches, size=n_damaged)
    if n_damaged:
        src = rng.integers(0, n_cells, size=n_damaged)
        frac_native = rng.uniform(0.3, 0.7, size=n_damaged)
        d_depth = rng.lognormal(np.log(max(native_depth * 0.1, 4 * empty_depth)), 0.4, size=n_damaged)
        src_f = f[src]
        src_f = np.where(src_f.sum(1, keepdims=True) > 0, src_f, ambient[d_batch])
        rate = d_depth[:, None] * (frac_native[:, None] * src_f + (1 - frac_native[:, None]) * ambient[d_batch])
        damaged = sparse.csr_matrix(rng.poisson(rate).astype(np.float32))
    else:
        damaged = sparse.csr_matrix((0, G), dtype=np.float32)
    raw_X = sparse.vstack([adata.X, empties, damaged], format="csr")
    raw_obs = pd.DataFrame(
        index=pd.Index(
            [*cell_names, *(f"empty_{i}" for i in range(n_empty)), *(f"damaged_{i}" for i in range(n_damaged))]
        )
    )
    raw_obs["droplet_type"] = pd.Categorical(
        ["cell"] * n_cells + ["empty"] * n_empty + ["damaged"] * n_damaged, categories=["cell", "empty", "damaged"]
    )
    raw_obs["batch"] = pd.Categorical(
        [batch_cats[b] for b in np.concatenate([batch, e_batch, d_batch])], categories=batch_cats
    )
    raw_adata = ad.AnnData(X=raw_X, obs=raw_obs, var=pd.DataFrame(index=var_names.copy()))
    return adata, raw_adata


def _sample_sparse_profiles(rng, n_umis, profiles, which, n_genes) -> sparse.csr_matrix:
    """Droplets ``d`` with ``n_umis[d]`` UMIs drawn from ``profiles[which[d]]``, built sparse."""
    n_umis = np.asarray(n_umis, dtype=np.int64)
    rows = np.repeat(np.arange(n_umis.size), n_umis)
    cols = np.empty(rows.size, dtype=np.int64)
    row_profile = np.repeat(which, n_umis)
    for b in np.unique(which):
        sel = row_profile == b
        cdf = np.cumsum(profiles[b])
        cols[sel] = np.minimum(np.searchsorted(cdf, rng.random(int(sel.sum())) * cdf[-1], side="right"), n_genes - 1)
    out = sparse.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_umis.size, n_genes)
    )
    out.sum_duplicates()
    return out


def _type_programs(rng: np.random.Generator, n_types: int, n_genes: int) -> np.ndarray:
    """Sparse native programs: a shared heavy-tailed base, each type silencing part of the genes."""
    base = rng.lognormal(0.0, 1.2, size=n_genes)
    programs = np.empty((n_types, n_genes))
    n_markers = max(1, n_genes // (4 * n_types))
    for k in range(n_types):
        on = rng.random(n_genes) < 0.6  # a type expresses ~60% of the genes
        prog = base * on * rng.lognormal(0.0, 0.3, size=n_genes)
        markers = rng.choice(n_genes, size=n_markers, replace=False)
        prog[markers] = base[markers] * rng.uniform(5.0, 20.0, size=n_markers)
        programs[k] = prog / prog.sum()
    return programs


def _check_int(value, arg: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}.")
