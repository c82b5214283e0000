"""Array statistics used by VELOVI: initial switch estimates, directional uncertainty, permutation tests.

Everything is vectorised over cells and genes; sparse inputs are densified one block of genes or cells at a
time only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import ttest_ind

_BLOCK_ELEMENTS = 1 << 24  # ~64 MB of float32 per dense block


def _dense_columns(X, start: int, stop: int) -> np.ndarray:
    block = X[:, start:stop]
    if sparse.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def switch_estimates(spliced, unspliced, top_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Per gene: median unspliced of its top ``top_fraction`` unspliced cells, and median spliced there.

    Matches veloVI's initialisation (the cells ranked per gene by unspliced abundance) with a partial sort
    instead of a full one; dense, sparse or backed inputs are read one block of genes at a time.
    """
    n, g = unspliced.shape
    first = int(n * (1 - top_fraction))
    first = min(first, n - 1)
    if sparse.issparse(spliced):
        spliced = spliced.tocsc()
    if sparse.issparse(unspliced):
        unspliced = unspliced.tocsc()
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    u_upper = np.empty(g)
    s_upper = np.empty(g)
    for start in range(0, g, step):
        stop = min(start + step, g)
        u = _dense_columns(unspliced, start, stop)
        s = _dense_columns(spliced, start, stop)
        top = np.argpartition(u, first, axis=0)[first:]
        u_upper[start:stop] = np.median(np.take_along_axis(u, top, axis=0), axis=0)
        s_upper[start:stop] = np.median(np.take_along_axis(s, top, axis=0), axis=0)
    return s_upper, u_upper


def directional_statistics(velocities: np.ndarray, n_jobs: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """Spread of posterior velocity samples around their mean direction, per cell.

    Parameters
    ----------
    velocities
        Array ``(n_samples, n_cells, n_genes)``.
    n_jobs
        Number of threads over blocks of cells (-1: all cores).

    Returns
    -------
    Statistics per cell (columns as in veloVI) and the ``(n_cells, n_samples)`` cosine similarities of the
    gene-centred samples to the gene-centred mean (a Pearson correlation). A zero vector has cosine 0 with
    everything (the original gives NaN).
    """
    n_samples, n_cells, _ = velocities.shape
    cos = np.empty((n_cells, n_samples), dtype=np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, velocities.shape[0] * velocities.shape[2]))

    def block(start: int) -> None:
        v = np.array(velocities[:, start : start + step], dtype=np.float64)  # a copy: centred in place
        v -= v.mean(-1, keepdims=True)
        m = v.mean(0)
        # dot products and squared norms over genes straight into (cells, samples): no product arrays
        num = np.einsum("scg,cg->cs", v, m)
        den = np.sqrt(np.einsum("scg,scg->cs", v, v) * np.einsum("cg,cg->c", m, m)[:, None])
        c = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        cos[start : start + step] = np.clip(c, -1.0, 1.0, out=c)

    starts = range(0, n_cells, step)
    workers = _cpu_count() if n_jobs in (-1, None) else max(1, int(n_jobs))
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(block, starts))
    else:
        for start in starts:
            block(start)

    angle = np.arccos(cos)
    p_angle = np.percentile(angle, [5, 95], axis=1)
    p_cos = np.percentile(cos, [5, 95], axis=1)
    stats = pd.DataFrame(
        {
            "directional_variance": angle.var(axis=1),
            "directional_difference": p_angle[1] - p_angle[0],
            "directional_cosine_sim_variance": cos.var(axis=1),
            "directional_cosine_sim_difference": p_cos[1] - p_cos[0],
            "directional_cosine_sim_mean": cos.mean(axis=1),
        }
    )
    return stats, cos


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def permute_within_groups(X, groups: np.ndarray, rng: np.random.Generator):
    """Shuffle every column of ``X`` independently within each group of rows (dense or sparse).

    Sparse input gives CSR output; it is densified one (group, block of genes) at a time.
    """
    is_sparse = sparse.issparse(X)
    X = sparse.csr_matrix(X) if is_sparse else np.asarray(X)
    dense_out = None if is_sparse else np.empty(X.shape, dtype=np.result_type(X.dtype, np.float32))
    pieces_r, pieces_c, pieces_v = [], [], []
    for group in pd.unique(groups):
        rows = np.flatnonzero(groups == group)
        step = max(1, _BLOCK_ELEMENTS // max(1, rows.size))
        sub = X[rows]
        for start in range(0, X.shape[1], step):
            stop = min(start + step, X.shape[1])
            block = sub[:, start:stop]
            block = block.toarray() if is_sparse else block
            shuffled = rng.permuted(block, axis=0)
            if is_sparse:
                r, c = np.nonzero(shuffled)
                pieces_r.append(rows[r])
                pieces_c.append(c + start)
                pieces_v.append(shuffled[r, c])
            else:
                dense_out[rows, start:stop] = shuffled
    if not is_sparse:
        return dense_out
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.empty(0, dtype=dt)
    return sparse.csr_matrix(
        (cat(pieces_v, X.dtype), (cat(pieces_r, np.int64), cat(pieces_c, np.int64))), shape=X.shape
    )


def sample_group_rows(groups: np.ndarray, max_cells: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Up to ``max_cells`` randomly chosen row indices (sorted) of each group, in order of appearance."""
    out = {}
    for group in pd.unique(groups):
        rows = np.flatnonzero(groups == group)
        if rows.size > max_cells:
            rows = np.sort(rng.choice(rows, max_cells, replace=False))
        out[group] = rows
    return out


def group_ttests(
    permuted_error: np.ndarray, original_error: np.ndarray, rows_by_group: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Student's t-statistic per (gene, group) of permuted vs original errors over each group's rows.

    Columns: groups, rows: genes (positional)."""
    out = {}
    for group, rows in rows_by_group.items():
        out[group] = ttest_ind(permuted_error[rows], original_error[rows], axis=0).statistic
    return pd.DataFrame(out)
