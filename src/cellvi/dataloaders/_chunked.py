"""Larger-than-memory outputs: a model's ``get_*`` method written to an h5ad file chunk by chunk."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from cellvi._io import atomic_path

_TARGETS = ("X", "layers", "obsm")


def _parse_key(key: str) -> tuple[str, str | None]:
    if not isinstance(key, str):
        raise ValueError(f"key must be 'X', 'layers/<name>' or 'obsm/<name>', got {key!r}.")
    if key == "X":
        return "X", None
    group, _, name = key.partition("/")
    if group not in _TARGETS[1:] or not name or "/" in name:
        raise ValueError(f"key must be 'X', 'layers/<name>' or 'obsm/<name>', got {key!r}.")
    return group, name


def _as_rows(out, n_rows: int, what: str):
    """``(matrix, column names or None)`` for one chunk's output: CSR stays CSR, else a 2-D ndarray."""
    columns = None
    if isinstance(out, pd.DataFrame):
        columns = out.columns.astype(str)
        out = out.to_numpy()
    elif sparse.issparse(out):
        out = sparse.csr_matrix(out)
    else:
        out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != n_rows:
        raise ValueError(
            f"method: {what} returned shape {out.shape} for {n_rows} cells; write_in_chunks writes "
            "cells x features outputs (pass return_mean=True / n_samples=1 where the method samples)."
        )
    if not sparse.issparse(out) and not np.issubdtype(out.dtype, np.number) and out.dtype != bool:
        raise ValueError(f"method: {what} returned dtype {out.dtype}; expected numbers.")
    return out, columns


def write_in_chunks(
    method: Callable,
    path: str | os.PathLike,
    key: str = "X",
    *,
    indices: Sequence[int] | None = None,
    chunk_size: int = 16384,
    progress_bar: bool = True,
    **method_kwargs,
) -> Path:
    """Write a model's per-cell output to an h5ad file, one chunk of cells at a time.

    ``method`` is a bound ``get_*`` method of a trained model (``model.get_denoised_counts``,
    ``model.get_latent_representation``, ``model.get_velocity`` ...). It is called with
    ``indices=`` one chunk of cells at a time and each chunk's rows are appended to the file, so
    neither the output nor (for a model set up on a backed AnnData) the input is ever whole in
    memory: memory is that of one chunk's output plus the method's own minibatches. Sparse outputs
    stay sparse (CSR, appended incrementally); dense outputs go to a preallocated array. The file
    is written beside ``path`` and moved onto it only when complete.

    The result is an ordinary h5ad file: ``anndata.read_h5ad(path)`` (or ``backed="r"``) gives an
    AnnData whose ``obs_names`` are the cells written, in order, and whose ``var_names`` are the
    output's columns (genes) for ``"X"``/``"layers/..."``, or the model's genes for
    ``"obsm/..."``. Copy it into your own AnnData with, e.g.,
    ``adata.layers["denoised"] = anndata.read_h5ad(path).X``.

    Parameters
    ----------
    method
        Bound method of a trained model that accepts ``indices=`` (and ``adata=``) and returns one
        row per cell: a 2-D array, a sparse matrix or a DataFrame.
    path
        Output ``.h5ad`` file (replaced if it exists).
    key
        Where the output goes: ``"X"``, ``"layers/<name>"`` or ``"obsm/<name>"`` (use ``obsm`` for
        outputs whose columns are not genes, such as latent representations).
    indices
        Cells of the AnnData (positions) to write, in this order. ``None``: all cells.
    chunk_size
        Cells per call of ``method``; rounded up to a multiple of the minibatch size
        (``method_kwargs["batch_size"]``, else ``scvi.settings.batch_size``) so that the
        minibatches, and with them the random draws of a seeded sampling method, are those of
        one in-memory call.
    progress_bar
        Show a progress bar over the chunks.
    **method_kwargs
        Passed to ``method`` on every call (e.g. ``adata=``, ``batch_size=``, ``n_samples=``).

    Returns
    -------
    The path written.

    Examples
    --------
    >>> import anndata, cellvi, scvi
    >>> from cellvi.dataloaders import write_in_chunks
    >>> adata, raw = cellvi.data.simulate_ambient(n_cells=300, n_genes=50, n_empty=500, seed=0)
    >>> cellvi.SCAR.setup_anndata(adata)
    >>> _ = cellvi.SCAR.get_ambient_profile(adata, raw)
    >>> model = cellvi.SCAR(adata, n_latent=4)
    >>> model.train(max_epochs=2, enable_progress_bar=False)
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "denoised.h5ad")
    >>> _ = write_in_chunks(model.get_denoised_counts, out, chunk_size=128, progress_bar=False)
    >>> anndata.read_h5ad(out).X.shape
    (300, 50)
    """
    import scvi
    from anndata.io import sparse_dataset, write_elem
    from scvi.utils import track

    if not callable(method) or getattr(method, "__self__", None) is None:
        raise ValueError("method must be a bound method of a trained model, e.g. model.get_denoised_counts.")
    model = method.__self__
    what = f"{type(model).__name__}.{getattr(method, '__name__', 'method')}"
    group, name = _parse_key(key)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if "indices" in method_kwargs:
        raise ValueError("indices: pass it to write_in_chunks, not in method_kwargs.")
    adata = method_kwargs.get("adata")
    adata = model._validate_anndata(adata) if adata is not None else model.adata
    n_obs = adata.n_obs
    if indices is None:
        indices = np.arange(n_obs)
    else:
        indices = np.asarray(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError("indices must be a 1-D sequence of integer cell positions.")
        if indices.size and (indices.min() < -n_obs or indices.max() >= n_obs):
            raise ValueError(f"indices must lie in [0, {n_obs}) (positions in adata).")
        indices = np.where(indices < 0, indices + n_obs, indices)
    batch_size = method_kwargs.get("batch_size") or scvi.settings.batch_size
    chunk_size = -(-int(chunk_size) // batch_size) * batch_size
    if len(indices) == 0:
        raise ValueError("indices: no cells to write.")
    starts = range(0, len(indices), chunk_size)
    obs_names = adata.obs_names[indices]

    path = Path(path)
    with atomic_path(path) as tmp:
        f = None
        try:
            for start in track(starts, description=f"Writing {what}", disable=not progress_bar, style="tqdm"):
                chunk = indices[start : start + chunk_size]
                out = method(indices=chunk, **method_kwargs)
                expected = obs_names[start : start + len(chunk)]
                if isinstance(out, pd.DataFrame) and not out.index.equals(expected):
                    raise ValueError(f"method: {what} returned rows that are not the cells asked for.")
                rows, columns = _as_rows(out, len(chunk), what)
                if f is None:
                    f, parent, leaf = _open_skeleton(
                        tmp, obs_names, adata.var_names, group, name, rows.shape[1], columns, what
                    )
                    is_sparse, n_cols, dtype = sparse.issparse(rows), rows.shape[1], rows.dtype
                    if is_sparse:
                        write_elem(parent, leaf, rows)
                        matrix = sparse_dataset(parent[leaf])
                        continue
                    rows_per_h5_chunk = max(1, min(len(indices), chunk_size, 2**18 // max(1, n_cols)))
                    matrix = parent.create_dataset(
                        leaf,
                        shape=(len(indices), n_cols),
                        dtype=dtype,
                        chunks=(rows_per_h5_chunk, n_cols) if n_cols else None,
                    )
                    matrix.attrs["encoding-type"] = "array"
                    matrix.attrs["encoding-version"] = "0.2.0"
                if rows.shape[1] != n_cols or sparse.issparse(rows) != is_sparse:
                    raise ValueError(f"method: {what} returned chunks of different widths or kinds.")
                if is_sparse:
                    matrix.append(rows.astype(dtype, copy=False))
                else:
                    matrix[start : start + len(chunk)] = rows.astype(dtype, copy=False)
        finally:
            if f is not None:
                f.close()
    return path


def _open_skeleton(tmp, obs_names, model_var_names, group, name, n_cols, columns, what):
    """Write an AnnData with only obs/var names to ``tmp``; open it to add the output.

    Returns ``(h5py file, parent group, element name)``.
    """
    import anndata as ad
    import h5py

    if group == "obsm":
        var_names = model_var_names
    elif columns is not None:
        var_names = pd.Index(columns)
    elif n_cols == len(model_var_names):
        var_names = model_var_names
    else:
        raise ValueError(
            f"key: {what} returned {n_cols} columns, not one per gene ({len(model_var_names)}); "
            "write it to 'obsm/<name>'."
        )
    skeleton = ad.AnnData(
        obs=pd.DataFrame(index=pd.Index(np.asarray(obs_names), dtype=str)),
        var=pd.DataFrame(index=pd.Index(np.asarray(var_names), dtype=str)),
    )
    skeleton.write_h5ad(tmp)
    f = h5py.File(tmp, "a")
    if group == "X":
        return f, f, "X"
    return f, f[group], name
