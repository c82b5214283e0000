"""Ambient profile from the empty droplets of a raw droplet matrix (sparse, chunked, depth-aware)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import gammaln

from cellvi._validation import check_counts, iter_row_chunks

logger = logging.getLogger(__name__)

MIN_CELL_FREE = 50


def _read_rows(X, rows: np.ndarray, cols: np.ndarray | None, n_chunks: int) -> sparse.csr_matrix:
    """Rows ``rows`` (sorted) and columns ``cols`` of a dense, sparse or backed matrix, as CSR."""
    out = []
    step = max(1, int(np.ceil(rows.size / max(n_chunks, 1))))
    for i in range(0, rows.size, step):
        block = X[rows[i : i + step]]
        block = sparse.csr_matrix(block) if not sparse.issparse(block) else block.tocsr()
        out.append(block[:, cols] if cols is not None else block)
    if not out:
        return sparse.csr_matrix((0, 0 if cols is None else cols.size))
    return sparse.vstack(out, format="csr")


def droplet_totals(X, cols: np.ndarray | None) -> np.ndarray:
    """Total counts of every row of ``X`` over the columns ``cols`` (chunked, never dense)."""
    totals = np.empty(X.shape[0], dtype=np.float64)
    for start, block in iter_row_chunks(X):
        block = sparse.csr_matrix(block) if not sparse.issparse(block) else block.tocsr()
        if cols is not None:
            block = block[:, cols]
        totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
    return totals


def multinomial_loglik(X: sparse.csr_matrix, log_a: np.ndarray) -> np.ndarray:
    """``log Multinomial(x_d; N_d, a)`` of each row, from the non-zeros only (float64)."""
    X = X.tocsr()
    data = X.data.astype(np.float64)
    la = log_a[X.indices]
    with np.errstate(invalid="ignore"):
        per_entry = np.where(data > 0, data * la, 0.0) - gammaln(data + 1)
    row = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    per_row = np.bincount(row, weights=per_entry, minlength=X.shape[0])
    n = np.asarray(X.sum(axis=1)).ravel()
    return gammaln(n + 1) + per_row


def null_loglik(a: np.ndarray, max_depth: int, n_mc: int, rng: np.random.Generator) -> np.ndarray:
    """Monte Carlo null of the multinomial log-likelihood at every depth ``1..max_depth``.

    Returns an array ``(max_depth + 1, n_mc)`` whose row ``n`` holds, sorted, the log-likelihoods
    under ``a`` of ``n_mc`` droplets of depth ``n`` drawn from ``a`` itself. The draws are sequential
    (one UMI at a time for all replicates), so one pass gives every depth (as in EmptyDrops).
    """
    log_a = np.log(np.where(a > 0, a, 1.0))
    cdf = np.cumsum(a)
    counts = np.zeros((n_mc, a.size), dtype=np.int32)
    out = np.zeros((max_depth + 1, n_mc))
    cur = np.zeros(n_mc)
    reps = np.arange(n_mc)
    genes = np.minimum(np.searchsorted(cdf, rng.random((max_depth, n_mc)) * cdf[-1], side="right"), a.size - 1)
    log_n = np.log(np.arange(1, max_depth + 1))
    for n in range(max_depth):  # one vectorised step per depth, over all replicates
        g = genes[n]
        c = counts[reps, g]
        cur = cur + log_n[n] - np.log1p(c) + log_a[g]
        counts[reps, g] = c + 1
        out[n + 1] = cur
    out.sort(axis=1)
    return out


def empty_pvalues(loglik: np.ndarray, depth: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Monte Carlo p-value ``(1 + #{null <= L_d}) / (n_mc + 1)`` of each droplet at its own depth."""
    n_mc = null.shape[1]
    p = np.full(loglik.size, np.nan)
    depth = depth.astype(np.int64)
    order = np.argsort(depth, kind="stable")
    d_sorted = depth[order]
    bounds = np.flatnonzero(np.diff(d_sorted)) + 1
    for grp in np.split(order, bounds):  # one step per distinct depth
        if grp.size == 0:
            continue
        n = depth[grp[0]]
        p[grp] = (1 + np.searchsorted(null[n], loglik[grp], side="right")) / (n_mc + 1)
    return p


def estimate_profile(
    X: sparse.csr_matrix,
    prob: float,
    iterations: int,
    rng: np.random.Generator,
    n_mc: int = 1000,
    max_depth: int = 5000,
    where: str = "raw_adata",
) -> tuple[np.ndarray, int]:
    """Iterate: test each droplet against the current profile at its depth, re-estimate from the passing ones.

    Returns the profile (sums to 1) and the number of cell-free droplets it was estimated from.
    """
    depth = np.asarray(X.sum(axis=1)).ravel()
    # start from the mean of the droplets' own profiles (equal weights: a few deep droplets do not dominate)
    inv = sparse.diags(1.0 / np.maximum(depth, 1.0))
    a = np.asarray((inv @ X).sum(axis=0)).ravel()
    a = a / a.sum()
    n_free = X.shape[0]
    for _ in range(iterations):
        testable = depth <= max_depth
        log_a = np.log(np.where(a > 0, a, 0.0), where=a > 0, out=np.full(a.size, -np.inf))
        loglik = multinomial_loglik(X, log_a)
        null = null_loglik(a, int(min(depth[testable].max(initial=1), max_depth)), n_mc, rng)
        free = np.zeros(depth.size, dtype=bool)
        pv = empty_pvalues(loglik[testable], depth[testable], null)
        free[np.flatnonzero(testable)] = pv > 1.0 - prob
        n_free = int(free.sum())
        if n_free < MIN_CELL_FREE:
            raise ValueError(
                f"{where}: only {n_free} of {depth.size} tested droplets look cell-free (consistent with the "
                f"ambient profile at prob={prob}); at least {MIN_CELL_FREE} are needed. Pass the unfiltered raw "
                "matrix (raw_feature_bc_matrix, with its empty droplets), lower min_raw_counts, or raise prob."
            )
        a = np.asarray(X[free].sum(axis=0), dtype=np.float64).ravel()
        a = a / a.sum()
    return a, n_free


def get_ambient_profile(
    adata,
    raw_adata,
    prob: float = 0.995,
    min_raw_counts: int = 2,
    iterations: int = 3,
    n_batch: int = 1,
    sample: int = 50000,
    batch_key: str | None = None,
    seed: int | None = 0,
    layer: str | None = None,
) -> pd.DataFrame:
    """See :meth:`cellvi.SCAR.get_ambient_profile`."""
    from cellvi._validation import check_positive_int, check_probability

    prob = check_probability(prob, "prob", inclusive=False)
    min_raw_counts = check_positive_int(min_raw_counts, "min_raw_counts", minimum=0)
    iterations = check_positive_int(iterations, "iterations", minimum=0)
    n_batch = check_positive_int(n_batch, "n_batch", minimum=1)
    sample = check_positive_int(sample, "sample", minimum=MIN_CELL_FREE)
    missing = adata.var_names.difference(raw_adata.var_names)
    if missing.size:
        shown = ", ".join(map(str, missing[:5]))
        raise ValueError(
            f"raw_adata lacks {missing.size} of the {adata.n_vars} genes of adata ({shown}"
            f"{' ...' if missing.size > 5 else ''}); pass the raw matrix of the same experiment and features."
        )
    if not raw_adata.var_names.is_unique:
        raise ValueError("raw_adata.var_names are not unique; call raw_adata.var_names_make_unique() first.")
    cols = raw_adata.var_names.get_indexer(adata.var_names)
    if np.array_equal(cols, np.arange(raw_adata.n_vars)):
        cols = None
    if layer is not None and layer not in raw_adata.layers:
        raise ValueError(f"layer={layer!r} is not a layer of raw_adata; its layers are {list(raw_adata.layers)}.")
    raw_X = raw_adata.X if layer is None else raw_adata.layers[layer]
    check_counts(raw_X, "raw_adata.X" if layer is None else f"raw_adata.layers[{layer!r}]")

    if batch_key is not None:
        for name, ad_ in (("adata", adata), ("raw_adata", raw_adata)):
            if batch_key not in ad_.obs.columns:
                raise ValueError(f"batch_key={batch_key!r} is not a column of {name}.obs.")
        cats = pd.Index(pd.Categorical(adata.obs[batch_key]).categories)
        raw_batch = pd.Categorical(raw_adata.obs[batch_key].astype(str), categories=cats.astype(str))
        cats_str = cats.astype(str)
    else:
        cats_str = pd.Index(["ambient_profile"])
        raw_batch = None

    rng = np.random.default_rng(seed)
    totals = droplet_totals(raw_X, cols)
    candidate = (~raw_adata.obs_names.isin(adata.obs_names)) & (totals >= max(min_raw_counts, 1))
    profiles = np.zeros((adata.n_vars, cats_str.size))
    n_free = {}
    for j, b in enumerate(cats_str):
        mask = candidate if raw_batch is None else candidate & (np.asarray(raw_batch.codes) == j)
        rows = np.flatnonzero(mask)
        where = "raw_adata" if raw_batch is None else f"raw_adata (batch {b!r})"
        if rows.size < MIN_CELL_FREE:
            raise ValueError(
                f"{where}: only {rows.size} droplets outside adata have >= {min_raw_counts} counts; at least "
                f"{MIN_CELL_FREE} empty droplets are needed. Pass the unfiltered raw matrix "
                "(raw_feature_bc_matrix), or lower min_raw_counts."
            )
        if rows.size > sample:
            rows = np.sort(rng.choice(rows, size=sample, replace=False))
        X = _read_rows(raw_X, rows, cols, n_batch)
        X.data = X.data.astype(np.float64)
        profiles[:, j], n_free[b] = estimate_profile(X, prob, iterations, rng, where=where)
        logger.info("ambient profile of %s from %d cell-free droplets", b, n_free[b])
    adata.varm["ambient_profile"] = profiles
    out = pd.DataFrame(profiles, index=adata.var_names.copy(), columns=cats_str)
    out.attrs["n_cell_free"] = n_free
    return out
