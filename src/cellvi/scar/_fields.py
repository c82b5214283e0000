"""The data-only constant of SCAR's Binomial likelihood, computed once per cell at setup."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.special import gammaln
from scvi.data.fields import NumericalObsField

from cellvi._validation import get_matrix, iter_row_chunks

LOG_BINOM_KEY = "log_binom_const"
"""Registry key of the per-cell constant (the minibatch tensor of that name)."""

LOG_BINOM_OBS = "_scar_log_binom"
"""Column of ``adata.obs`` that setup writes the per-cell constant to."""


def log_binomial_constant(X) -> np.ndarray:
    r"""Per cell ``sum_g log C(n_c, x_cg)`` with ``n_c = sum_g x_cg`` (float64, shape ``(n_cells,)``).

    The normalising constant of the Binomial likelihood does not depend on the parameters, and
    ``log C(n, 0) = 0``, so only the non-zero counts contribute. Computed in row chunks on the
    non-zeros (a dense chunk is made sparse; nothing larger than a chunk is densified).
    """
    out = np.empty(X.shape[0], dtype=np.float64)
    for start, block in iter_row_chunks(X):
        block = sparse.csr_matrix(block)
        if not block.has_canonical_format:
            block = block.copy()
            block.sum_duplicates()
        counts = np.diff(block.indptr)
        rows = np.repeat(np.arange(block.shape[0]), counts)
        x = np.asarray(block.data, dtype=np.float64)
        n = np.bincount(rows, weights=x, minlength=block.shape[0])
        nr = n[rows]
        terms = gammaln(nr + 1) - gammaln(x + 1) - gammaln(nr - x + 1)
        out[start : start + block.shape[0]] = np.bincount(rows, weights=terms, minlength=block.shape[0])
    return out


class LogBinomialConstantField(NumericalObsField):
    """Registers :func:`log_binomial_constant` of the counts layer as ``adata.obs['_scar_log_binom']``.

    The column is (re)computed from the registered counts whenever the field is registered or
    transferred to another AnnData, so it always matches the counts it is used with.

    Parameters
    ----------
    layer
        The registered counts layer (``None`` for ``adata.X``).
    """

    def __init__(self, layer: str | None):
        super().__init__(LOG_BINOM_KEY, LOG_BINOM_OBS, required=True)
        self.layer = layer

    def _write(self, adata) -> None:
        adata.obs[LOG_BINOM_OBS] = log_binomial_constant(get_matrix(adata, self.layer))

    def register_field(self, adata) -> dict:
        self._write(adata)
        return super().register_field(adata)

    def transfer_field(self, state_registry: dict, adata_target, **kwargs) -> dict:
        self._write(adata_target)
        return super().transfer_field(state_registry, adata_target, **kwargs)
