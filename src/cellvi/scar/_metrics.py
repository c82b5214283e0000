"""Quality of ambient removal against simulated ground truth (used by the demo, tests and benchmark)."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def _rows_log1p_centered(X) -> np.ndarray:
    X = np.log1p(np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float64))
    return X - X.mean(1, keepdims=True)


def per_cell_log_corr(A, B) -> float:
    """Mean over cells of the Pearson correlation of ``log1p`` counts of ``A`` and ``B``."""
    a, b = _rows_log1p_centered(A), _rows_log1p_centered(B)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return float(np.mean((a * b).sum(1) / np.where(den > 0, den, np.inf)))


def rmse(A, B) -> float:
    """Root mean squared difference of two count matrices."""
    d = A - B
    d = d.toarray() if sparse.issparse(d) else np.asarray(d)
    return float(np.sqrt(np.mean(np.square(d, dtype=np.float64))))


def ambient_removal_summary(observed, denoised, native) -> dict[str, float]:
    """Before/after figures: correlation, RMSE to the true native counts, native counts removed, counts added."""
    obs = sparse.csr_matrix(observed, dtype=np.float64)
    den = sparse.csr_matrix(denoised, dtype=np.float64)
    nat = sparse.csr_matrix(native, dtype=np.float64)
    return {
        "corr_observed": per_cell_log_corr(obs, nat),
        "corr_denoised": per_cell_log_corr(den, nat),
        "rmse_observed": rmse(obs, nat),
        "rmse_denoised": rmse(den, nat),
        "native_removed": float(1 - den.minimum(nat).sum() / nat.sum()),
        "ambient_removed": float((obs - den).maximum(0).minimum(obs - nat).sum() / max((obs - nat).sum(), 1)),
        "entries_above_observed": float((den > obs).sum() / np.prod(obs.shape)),
    }


def profile_match(est, true) -> dict[str, float]:
    """L1 distance and cosine similarity of two profiles (columns sum to 1)."""
    est, true = np.asarray(est, dtype=np.float64).ravel(), np.asarray(true, dtype=np.float64).ravel()
    return {"l1": float(np.abs(est - true).sum()), "cosine": float(est @ true / np.linalg.norm(est) / np.linalg.norm(true))}
