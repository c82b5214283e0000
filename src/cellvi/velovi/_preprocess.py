"""Preprocessing for VELOVI without scVelo: kNN moments, per-gene min-max scaling, steady-state gene filter."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from cellvi._validation import check_counts, check_layer, check_positive_int

from ._stats import _BLOCK_ELEMENTS, _dense_columns


def _scale_rows(X, factors: np.ndarray):
    if sparse.issparse(X):
        return sparse.diags(factors) @ X
    return np.asarray(X) * factors[:, None]


def compute_moments(
    adata: AnnData,
    spliced_layer: str = "spliced",
    unspliced_layer: str = "unspliced",
    n_neighbors: int = 30,
    n_pcs: int = 30,
    normalize: bool = True,
    use_rep: str | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData:
    """First-order moments of spliced and unspliced abundances over a kNN graph (scVelo's ``Ms``/``Mu``).

    Each layer is normalised by its per-cell total (scaled to the median total; ``normalize``), a
    neighbour graph is built with :func:`scanpy.pp.neighbors` on the PCA of ``log1p`` normalised spliced
    abundances (or on ``adata.obsm[use_rep]``), and every cell's abundances are averaged over itself and its
    neighbours, as ``scvelo.pp.moments`` does.

    Parameters
    ----------
    adata
        AnnData with raw spliced and unspliced counts (dense or sparse).
    spliced_layer, unspliced_layer
        Layers holding the spliced and unspliced counts.
    n_neighbors
        Number of neighbours per cell.
    n_pcs
        Number of principal components for the graph.
    normalize
        Normalise each layer by its per-cell total first.
    use_rep
        Key of ``adata.obsm`` to build the graph on instead of the PCA.
    random_state
        Seed of the PCA.
    copy
        Write to a copy of ``adata`` instead of ``adata`` itself.

    Returns
    -------
    The AnnData written to (``adata`` itself unless ``copy``), with ``layers['Ms']`` and ``layers['Mu']``
    (dense float32), the graph in ``obsp['velovi_connectivities']`` / ``obsp['velovi_distances']`` and its
    settings in ``uns['velovi_neighbors']``. Nothing else is changed.
    """
    import scanpy as sc

    for arg, layer in (("spliced_layer", spliced_layer), ("unspliced_layer", unspliced_layer)):
        check_layer(adata, layer, arg)
        check_counts(adata.layers[layer], f"adata.layers[{layer!r}] ({arg})", integer=False)
    check_positive_int(n_neighbors, "n_neighbors")
    check_positive_int(n_pcs, "n_pcs")
    if adata.n_obs < 3:
        raise ValueError(f"adata has {adata.n_obs} cell(s); moments need at least 3.")
    if use_rep is not None and use_rep not in adata.obsm:
        raise ValueError(f"use_rep={use_rep!r} is not in adata.obsm; available: {list(adata.obsm.keys())}.")
    if copy:
        adata = adata.copy()

    S, U = adata.layers[spliced_layer], adata.layers[unspliced_layer]
    if normalize:
        factors = []
        for X in (S, U):
            total = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
            target = np.median(total[total > 0]) if (total > 0).any() else 1.0
            factors.append(np.divide(target, total, out=np.zeros_like(total), where=total > 0))
        S, U = _scale_rows(S, factors[0]), _scale_rows(U, factors[1])

    k = min(n_neighbors, adata.n_obs - 1)
    if use_rep is None:
        tmp = AnnData(X=S.log1p() if sparse.issparse(S) else np.log1p(np.asarray(S, dtype=np.float32)))
        n_comps = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
        if n_comps >= 2:
            sc.pp.pca(tmp, n_comps=n_comps, random_state=random_state)
            rep = "X_pca"
        else:
            rep = "X"
    else:
        tmp = AnnData(
            obs=pd.DataFrame(index=np.arange(adata.n_obs).astype(str)), obsm={"rep": adata.obsm[use_rep]}
        )
        rep = "rep"
    sc.pp.neighbors(tmp, n_neighbors=k + 1, use_rep=rep, method="gauss", transformer="sklearn")
    conn = tmp.obsp["connectivities"]
    graph = (conn > 0).astype(np.float32).tolil()
    graph.setdiag(1.0)
    graph = graph.tocsr()
    graph = sparse.diags(1.0 / np.asarray(graph.sum(axis=1)).ravel()) @ graph

    def smooth(X):
        out = graph @ (X if sparse.issparse(X) else np.asarray(X, dtype=np.float32))
        return np.asarray(out.toarray() if sparse.issparse(out) else out, dtype=np.float32)

    adata.layers["Ms"] = smooth(S)
    adata.layers["Mu"] = smooth(U)
    adata.obsp["velovi_connectivities"] = conn
    adata.obsp["velovi_distances"] = tmp.obsp["distances"]
    adata.uns["velovi_neighbors"] = {
        "connectivities_key": "velovi_connectivities",
        "distances_key": "velovi_distances",
        "params": {
            "n_neighbors": int(k),
            "n_pcs": int(n_pcs),
            "use_rep": use_rep,
            "normalize": bool(normalize),
        },
    }
    return adata


def _column_min_max(X) -> tuple[np.ndarray, np.ndarray]:
    if sparse.issparse(X):
        return X.min(axis=0).toarray().ravel(), X.max(axis=0).toarray().ravel()
    X = np.asarray(X)
    return X.min(axis=0), X.max(axis=0)


def steady_state_fit(spliced, unspliced, perc: tuple[float, float] = (5, 95)) -> pd.DataFrame:
    """scVelo's deterministic steady-state model per gene: ``u = gamma * s`` on the extreme quantiles.

    Cells are weighted by whether ``s/max(s) + u/max(u)`` is below the ``perc[0]`` or above the ``perc[1]``
    percentile; ``gamma`` is the least-squares slope through the origin on those cells and ``r2`` the
    coefficient of determination of ``u - gamma s`` over all cells. ``velocity_genes`` applies scVelo's
    defaults (``r2 > 0.01``, ``gamma > 0.01``, both layers non-zero somewhere).
    """
    n, g = spliced.shape
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    S = spliced.tocsc() if sparse.issparse(spliced) else spliced
    U = unspliced.tocsc() if sparse.issparse(unspliced) else unspliced
    gamma, r2, ok = np.zeros(g), np.zeros(g), np.zeros(g, dtype=bool)
    for start in range(0, g, step):
        stop = min(start + step, g)
        s, u = _dense_columns(S, start, stop), _dense_columns(U, start, stop)
        s_max, u_max = s.max(0), u.max(0)
        xy = s / np.clip(s_max, 1e-3, None) + u / np.clip(u_max, 1e-3, None)
        lb, ub = np.percentile(xy, perc, axis=0)
        w = ((xy <= lb) | (xy >= ub)).astype(np.float64)
        ss = (w * s * s).sum(0)
        gm = np.divide((w * s * u).sum(0), ss, out=np.zeros(stop - start), where=ss > 0)
        res = u - gm * s
        tot = ((u - u.mean(0)) ** 2).sum(0)
        r2[start:stop] = np.where(tot > 0, 1 - (res**2).sum(0) / np.where(tot > 0, tot, 1.0), 0.0)
        gamma[start:stop] = gm
        ok[start:stop] = (s_max > 0) & (u_max > 0)
    return pd.DataFrame(
        {"velocity_gamma": gamma, "velocity_r2": r2, "velocity_genes": (r2 > 0.01) & (gamma > 0.01) & ok}
    )


def preprocess_data(
    adata: AnnData,
    spliced_layer: str = "Ms",
    unspliced_layer: str = "Mu",
    min_max_scale: bool = True,
    filter_on_r2: bool = True,
) -> AnnData:
    """Preprocess data for VELOVI: per-gene min-max scaling and filtering by a steady-state fit.

    The veloVI recipe (``velovi.preprocess_data``) without scVelo. Run it on moments
    (:func:`compute_moments`). ``adata`` itself is not modified.

    Parameters
    ----------
    adata
        AnnData with smoothed spliced and unspliced abundances.
    spliced_layer
        Name of the spliced layer.
    unspliced_layer
        Name of the unspliced layer.
    min_max_scale
        Min-max scale spliced and unspliced per gene to ``[0, 1]``. The minima and ranges are kept in
        ``var['velovi_{spliced,unspliced}_{min,range}']`` so that rates can be reported in unscaled units
        (:func:`write_velovi_results`).
    filter_on_r2
        Keep only genes whose steady-state fit has ``r2 > 0`` and ``gamma > 0`` and that pass scVelo's
        ``velocity_genes`` criteria. Genes that are zero in both layers are always removed.

    Returns
    -------
    A new AnnData (float32 layers) with ``var['velocity_gamma']``, ``var['velocity_r2']`` and
    ``var['velocity_genes']`` of the fit.
    """
    for arg, layer in (("spliced_layer", spliced_layer), ("unspliced_layer", unspliced_layer)):
        check_layer(adata, layer, arg)
        check_counts(adata.layers[layer], f"adata.layers[{layer!r}] ({arg})", integer=False)
    adata = adata.copy()
    for name, layer in (("spliced", spliced_layer), ("unspliced", unspliced_layer)):
        X = adata.layers[layer]
        lo, hi = _column_min_max(X)
        rng = hi - lo
        safe = np.where(rng > 0, rng, 1.0)
        if min_max_scale:
            if sparse.issparse(X) and not lo.any():
                X = (X @ sparse.diags(1.0 / safe)).astype(np.float32).tocsr()
            else:
                X = ((np.asarray(X.toarray() if sparse.issparse(X) else X) - lo) / safe).astype(np.float32)
            adata.layers[layer] = X
            adata.var[f"velovi_{name}_min"] = lo.astype(np.float64)
            adata.var[f"velovi_{name}_range"] = safe.astype(np.float64)
        elif not sparse.issparse(X):
            adata.layers[layer] = np.asarray(X, dtype=np.float32)
    fit = steady_state_fit(adata.layers[spliced_layer], adata.layers[unspliced_layer])
    fit.index = adata.var_names
    for col in fit.columns:
        adata.var[col] = fit[col].to_numpy()
    s_max = _column_min_max(adata.layers[spliced_layer])[1]
    u_max = _column_min_max(adata.layers[unspliced_layer])[1]
    keep = (s_max > 0) | (u_max > 0)
    if filter_on_r2:
        keep &= (fit["velocity_r2"].to_numpy() > 0) & (fit["velocity_gamma"].to_numpy() > 0)
        keep &= fit["velocity_genes"].to_numpy()
    if not keep.any():
        raise ValueError(
            "No gene passes the filter (steady-state fit with r2 > 0 and gamma > 0); check the layers or "
            "pass filter_on_r2=False."
        )
    return adata[:, keep].copy() if not keep.all() else adata
