"""Feature assignment for guide / hashtag / CMO counts: Bayes factors of counts against the ambient."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import poisson

LOG_BF_MAX = 709.78  # log of the largest float64, as in scAR


def log_bayes_factors(x: np.ndarray, ambient_mean: np.ndarray, adjust: str = "micro") -> np.ndarray:
    """``log P(X <= x) - log P(X = x)`` for ``X ~ Poisson(ambient_mean + adjustment)``, clipped to +-709.78.

    ``x`` and ``ambient_mean`` are (cells, features); ``adjust`` is ``"micro"`` (each cell's
    non-ambient counts spread evenly over the features), ``"global"`` (the mean of that over cells)
    or ``"none"``.
    """
    n_feat = x.shape[1]
    rest = np.clip(x.sum(1, keepdims=True) - ambient_mean.sum(1, keepdims=True), 0, None) / n_feat
    if adjust == "micro":
        lam = ambient_mean + rest
    elif adjust == "global":
        lam = ambient_mean + rest.mean()
    else:
        lam = ambient_mean
    lam = np.maximum(lam, 1e-10)
    log_bf = poisson.logcdf(x, lam) - poisson.logpmf(x, lam)
    return np.clip(np.nan_to_num(log_bf, nan=0.0, posinf=LOG_BF_MAX), -LOG_BF_MAX, LOG_BF_MAX)


def assign(log_bf: np.ndarray, log_cutoff: float, features: pd.Index, cells: pd.Index) -> pd.DataFrame:
    """Assign to each cell the features whose log Bayes factor reaches ``log_cutoff`` and is the row maximum."""
    best = log_bf.max(1)
    hit = (log_bf >= log_cutoff) & (log_bf >= best[:, None])
    n = hit.sum(1)
    names = np.asarray(features, dtype=object)
    rows, cols = np.nonzero(hit)
    joined = pd.Series(names[cols], index=rows).groupby(level=0).agg("+".join)
    feature = np.full(log_bf.shape[0], "", dtype=object)
    feature[joined.index.to_numpy()] = joined.to_numpy()
    return pd.DataFrame(
        {"feature": feature, "n_features": n.astype(np.int64), "log_bayes_factor": best.astype(np.float64)},
        index=cells.copy(),
    )
