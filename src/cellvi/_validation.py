"""Checks of user input shared by all models.

Each check reads the data in row chunks (sparse stays sparse, backed stays on disk), never
modifies it, and raises a :class:`ValueError` that names the argument and says what was expected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

CHUNK_ROWS = 8192


def iter_row_chunks(X, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, object]]:
    """Yield ``(start_row, block)`` over the rows of a dense, sparse or backed matrix.

    Blocks keep the storage of ``X`` (a sparse matrix gives sparse blocks); nothing is densified
    beyond one block.
    """
    n = X.shape[0]
    for start in range(0, n, chunk_rows):
        yield start, X[start : min(start + chunk_rows, n)]


def _values(block) -> np.ndarray:
    """Stored values of a block: the non-zeros of a sparse block, all entries of a dense one."""
    if sparse.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block).ravel()


def check_counts(
    X,
    arg: str = "adata.X",
    *,
    integer: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> None:
    """Raise if ``X`` holds NaN/inf, negative values or (when ``integer``) non-integer values.

    Parameters
    ----------
    X
        Dense, sparse or backed matrix (cells x genes).
    arg
        How the user passed ``X``, used in the error message (e.g. ``"adata.layers['counts']"``).
    integer
        Whether values must be whole numbers (raw counts).
    """
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{arg} is empty (shape {X.shape}); expected at least one cell and one gene.")
    for start, block in iter_row_chunks(X, chunk_rows):
        v = _values(block)
        if v.size == 0:
            continue
        if not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"{arg} has dtype {v.dtype}; expected a numeric matrix of counts.")
        if not np.all(np.isfinite(v)):
            row = start + _first_bad_row(block, lambda a: ~np.isfinite(a))
            raise ValueError(f"{arg} contains NaN or infinite values (first in row {row}); expected finite counts.")
        if v.min() < 0:
            row = start + _first_bad_row(block, lambda a: a < 0)
            raise ValueError(f"{arg} contains negative values (first in row {row}); expected counts >= 0.")
        if integer and np.issubdtype(v.dtype, np.floating) and np.any(v != np.round(v)):
            row = start + _first_bad_row(block, lambda a: a != np.round(a))
            raise ValueError(
                f"{arg} contains non-integer values (first in row {row}); expected raw integer counts. "
                "Pass the raw counts (e.g. a 'counts' layer), not normalised or log-transformed data."
            )


def _first_bad_row(block, bad) -> int:
    if sparse.issparse(block):
        csr = sparse.csr_matrix(block)
        mask = bad(csr.data)
        first = int(np.flatnonzero(mask)[0])
        return int(np.searchsorted(csr.indptr, first, side="right") - 1)
    rows = np.flatnonzero(np.any(bad(np.asarray(block)), axis=1))
    return int(rows[0])


def row_sums(X, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Per-row totals of a dense, sparse or backed matrix, read in chunks (float64)."""
    out = np.empty(X.shape[0], dtype=np.float64)
    for start, block in iter_row_chunks(X, chunk_rows):
        out[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
    return out


def check_no_empty_rows(X, arg: str, names: Sequence[str] | None = None, what: str = "cell") -> None:
    """Raise if any row of ``X`` sums to zero, naming up to five of them."""
    totals = row_sums(X)
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        shown = [str(names[i]) if names is not None else str(i) for i in empty[:5]]
        more = f" and {empty.size - 5} more" if empty.size > 5 else ""
        raise ValueError(
            f"{arg} has {empty.size} {what}(s) with zero total counts ({', '.join(shown)}{more}); "
            f"remove them first, e.g. `sc.pp.filter_cells(adata, min_counts=1)`."
        )


def check_obs_key(adata, key: str | None, arg: str, *, allow_nan: bool = False) -> None:
    """Raise if ``key`` is not a column of ``adata.obs`` (or holds missing values)."""
    if key is None:
        return
    if key not in adata.obs.columns:
        cols = ", ".join(map(repr, list(adata.obs.columns)[:10]))
        raise ValueError(f"{arg}={key!r} is not a column of adata.obs; available: {cols or 'none'}.")
    if not allow_nan and pd.isna(adata.obs[key]).any():
        n = int(pd.isna(adata.obs[key]).sum())
        raise ValueError(f"{arg}={key!r}: adata.obs[{key!r}] has {n} missing values; fill or drop them first.")


def check_layer(adata, layer: str | None, arg: str = "layer") -> None:
    """Raise if ``layer`` is given and is not in ``adata.layers``."""
    if layer is not None and layer not in adata.layers:
        have = ", ".join(map(repr, adata.layers.keys()))
        raise ValueError(f"{arg}={layer!r} is not in adata.layers; available: {have or 'none'}.")


def get_matrix(adata, layer: str | None):
    """``adata.layers[layer]`` or ``adata.X``, unmodified."""
    return adata.X if layer is None else adata.layers[layer]


def layer_arg(layer: str | None) -> str:
    """How to name a layer in an error message."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_positive_int(value, arg: str, minimum: int = 1) -> int:
    """Return ``value`` as an int or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_number(value, arg: str, *, minimum: float = 0.0, inclusive: bool = True) -> float:
    """Return ``value`` as a float or raise if it is not a Python number (not a bool) ``>= minimum``
    (``> minimum`` when ``inclusive`` is False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (value >= minimum if inclusive else value > minimum):
        raise ValueError(f"{arg} must be a number {'>=' if inclusive else '>'} {minimum:g}, got {value!r}.")
    return float(value)


def check_probability(value, arg: str, *, inclusive: bool = True) -> float:
    """Return ``value`` as a float or raise if it is not in [0, 1] (or (0, 1))."""
    ok = 0 <= value <= 1 if inclusive else 0 < value < 1
    if not isinstance(value, (int, float, np.floating, np.integer)) or not ok:
        bounds = "[0, 1]" if inclusive else "(0, 1)"
        raise ValueError(f"{arg} must be a number in {bounds}, got {value!r}.")
    return float(value)
