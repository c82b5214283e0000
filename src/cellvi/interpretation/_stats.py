"""Statistics of the interpretation suite, in array form (no Python loop over genes, cells or resamples).

* :func:`bh_adjust` / :func:`bh_adjust_nl10` -- Benjamini-Hochberg adjusted p-values along an axis
  (the second one on ``-log10 p`` so tiny p-values keep their precision).
* :func:`permutation_pvalue` and :func:`min_permutations` -- permutation p-values with the ``+1``
  correction (never exactly 0) and the number of permutations needed to reach a level.
* :class:`StreamingCorrelation`, :func:`correlation_to_z`, :func:`z_to_nl10_pvalue` -- Pearson correlations
  accumulated over minibatches and their normal-approximation z-values and ``-log10`` p-values.
* :func:`bootstrap_ci` -- percentile bootstrap confidence intervals of a statistic per group, the
  resamples drawn as index matrices in bounded-memory chunks.
* :func:`kmeans_silhouette` -- k-means with ``k`` chosen by the silhouette score on a sample of rows,
  so it scales to hundreds of thousands of cells.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

_LOG10 = math.log(10.0)


def bh_adjust(pvalues, axis: int = -1) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values along ``axis``.

    NaN entries are ignored (they stay NaN and do not count as tests).

    Parameters
    ----------
    pvalues
        Array of p-values in [0, 1].
    axis
        Axis holding the family of tests.

    Returns
    -------
    Array of the same shape: ``min_{j >= i} p_(j) m / j`` in sorted order, capped at 1.

    Examples
    --------
    >>> bh_adjust([0.01, 0.04, 0.03, 0.2]).round(3).tolist()
    [0.04, 0.053, 0.053, 0.2]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ValueError("pvalues must lie in [0, 1].")
    nl10 = -np.log10(np.clip(p, 1e-300, 1.0))
    nl10 = np.where(np.isnan(p), np.nan, nl10)
    out = 10.0 ** (-bh_adjust_nl10(nl10, axis=axis))
    return np.where(p == 0, 0.0, out) if np.any(p == 0) else out


def bh_adjust_nl10(nl10_pvalues, axis: int = -1) -> np.ndarray:
    """Benjamini-Hochberg adjustment on ``-log10`` p-values; returns ``-log10`` adjusted p-values.

    Working in log space keeps p-values far below ``1e-300`` distinct. NaN entries are ignored.
    """
    a = np.moveaxis(np.asarray(nl10_pvalues, dtype=np.float64), axis, -1)
    shape = a.shape
    a = a.reshape(-1, shape[-1]) if a.ndim else a.reshape(1, 1)
    nan = np.isnan(a)
    m = (~nan).sum(axis=1, keepdims=True)  # tests per family
    # sort p ascending = nl10 descending; NaNs last
    key = np.where(nan, -np.inf, a)
    order = np.argsort(-key, axis=1, kind="stable")
    sorted_nl10 = np.take_along_axis(a, order, axis=1)
    rank = np.arange(1, a.shape[1] + 1)[None, :]
    # log10 of p * m / rank
    adj = -sorted_nl10 + np.log10(np.maximum(m, 1)) - np.log10(rank)
    adj = np.where(np.isnan(adj), np.inf, adj)
    adj = np.minimum.accumulate(adj[:, ::-1], axis=1)[:, ::-1]
    adj = np.minimum(adj, 0.0)
    out = np.empty_like(a)
    np.put_along_axis(out, order, -adj, axis=1)
    out[nan] = np.nan
    out = out + 0.0  # -0.0 -> 0.0
    return np.moveaxis(out.reshape(shape), -1, axis) if len(shape) else out.reshape(())


def permutation_pvalue(n_as_extreme, n_permutations: int) -> np.ndarray:
    """Permutation p-value with the ``+1`` correction: ``(1 + #{T_perm as extreme as T_obs}) / (1 + n)``.

    The observed statistic counts as one of the permutations, so the p-value is never 0 and the test
    is exact (valid at every level).
    """
    n_permutations = int(n_permutations)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be an integer >= 1, got {n_permutations!r}.")
    return (1.0 + np.asarray(n_as_extreme, dtype=np.float64)) / (1.0 + n_permutations)


def min_permutations(n_tests: int, alpha: float) -> int:
    """Fewest permutations ``n`` such that the smallest p-value ``1 / (n + 1)`` is below ``alpha / n_tests``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}.")
    return max(1, int(math.floor(n_tests / alpha)))


class StreamingCorrelation:
    """Pearson correlations ``corr_i(a[i, ...], b[i, ...])`` accumulated over minibatches of rows.

    Sums are kept in float64, so the result equals the one-shot correlation up to rounding.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(100, 3)), rng.normal(size=(100, 3))
    >>> acc = StreamingCorrelation()
    >>> acc.update(a[:40], b[:40]); acc.update(a[40:], b[40:])
    >>> bool(np.allclose(acc.result(), [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(3)]))
    True
    """

    def __init__(self):
        self.n = 0
        self._sums = None

    def update(self, a, b) -> None:
        """Add rows ``a`` and ``b`` (same shape; the first axis is the sample axis; numpy or torch)."""
        mod = _array_module(a)
        a = a.double() if mod == "torch" else np.asarray(a, dtype=np.float64)
        b = b.double() if mod == "torch" else np.asarray(b, dtype=np.float64)
        parts = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)]
        if mod == "torch":
            parts = [p.cpu().numpy() for p in parts]
        self._sums = parts if self._sums is None else [s + p for s, p in zip(self._sums, parts, strict=True)]
        self.n += a.shape[0]

    def result(self) -> np.ndarray:
        """Correlations (NaN where a variable is constant)."""
        if self._sums is None or self.n < 2:
            raise ValueError("StreamingCorrelation needs at least two rows before result().")
        sa, sb, saa, sbb, sab = self._sums
        n = self.n
        cov = sab - sa * sb / n
        va = np.maximum(saa - sa * sa / n, 0.0)
        vb = np.maximum(sbb - sb * sb / n, 0.0)
        denom = np.sqrt(va * vb)
        tiny = 1e-12 * np.maximum(np.abs(saa) + np.abs(sbb), 1e-300)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denom > tiny, cov / np.where(denom > 0, denom, 1.0), np.nan)
        return np.clip(r, -1.0, 1.0)


def _array_module(x) -> str:
    return "torch" if type(x).__module__.startswith("torch") else "numpy"


def correlation_to_z(r, n) -> np.ndarray:
    """``z = r sqrt(n - 2) / sqrt(1 - r^2)``, the t statistic of a correlation read as a normal deviate."""
    r = np.clip(np.asarray(r, dtype=np.float64), -1 + 1e-12, 1 - 1e-12)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 3):
        raise ValueError("correlation_to_z needs n >= 3 samples.")
    return r * np.sqrt(n - 2.0) / np.sqrt(1.0 - r * r)


def z_to_nl10_pvalue(z, alternative: str = "two-sided") -> np.ndarray:
    """``-log10`` p-value of a normal deviate, exact in the far tail (no ``+ 1e-8`` floor).

    Parameters
    ----------
    z
        Normal deviates (NaN stays NaN).
    alternative
        ``"two-sided"``, ``"greater"`` (p = 1 - Phi(z)) or ``"less"``.
    """
    z = np.asarray(z, dtype=np.float64)
    if alternative == "two-sided":
        logp = stats.norm.logsf(np.abs(z)) + math.log(2.0)
    elif alternative == "greater":
        logp = stats.norm.logsf(z)
    elif alternative == "less":
        logp = stats.norm.logcdf(z)
    else:
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}.")
    return np.maximum(-logp / _LOG10, 0.0) + 0.0


def bootstrap_ci(
    values,
    groups=None,
    *,
    statistic: str = "median",
    n_bootstrap: int = 10_000,
    confidence: float = 0.95,
    random_state: int | None = 0,
    max_elements: int = 4_000_000,
):
    """Percentile bootstrap confidence intervals of a statistic, per group.

    Parameters
    ----------
    values
        (n,) values.
    groups
        (n,) group labels (any hashable); ``None``: one group.
    statistic
        ``"median"`` or ``"mean"``.
    n_bootstrap
        Resamples per group.
    confidence
        Coverage of the interval, e.g. 0.95 for the 2.5 and 97.5 percentiles.
    random_state
        Seed of the resampling.
    max_elements
        Largest resample matrix drawn at once (bounds memory).

    Returns
    -------
    :class:`pandas.DataFrame` indexed by group with columns ``n``, ``estimate``, ``ci_low``, ``ci_high``
    (float64; NaN for an empty group).
    """
    import pandas as pd

    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', got {statistic!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}.")
    n_bootstrap = int(n_bootstrap)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an integer >= 1, got {n_bootstrap!r}.")
    values = np.asarray(values, dtype=np.float64).ravel()
    if groups is None:
        codes, uniques = np.zeros(len(values), dtype=np.int64), pd.Index([0])
    else:
        codes, uniques = pd.factorize(np.asarray(groups), sort=True)
        uniques = pd.Index(uniques)
    func = np.median if statistic == "median" else np.mean
    rng = np.random.default_rng(random_state)
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    rows = []
    for g in range(len(uniques)):
        v = values[order[bounds[g] : bounds[g + 1]]]
        n = len(v)
        if n == 0:
            rows.append((0, np.nan, np.nan, np.nan))
            continue
        chunk = max(1, max_elements // n)
        stats_ = np.empty(n_bootstrap)
        for s in range(0, n_bootstrap, chunk):
            m = min(chunk, n_bootstrap - s)
            stats_[s : s + m] = func(v[rng.integers(0, n, size=(m, n))], axis=1)
        rows.append((n, float(func(v)), *np.percentile(stats_, [lo_q, hi_q])))
    out = pd.DataFrame(rows, index=uniques, columns=["n", "estimate", "ci_low", "ci_high"])
    out["n"] = out["n"].astype(np.int64)
    return out


def kmeans_silhouette(
    X,
    n_clusters: int | None = None,
    *,
    k_range: tuple[int, int] = (2, 12),
    sample_size: int = 5000,
    random_state: int | None = 42,
):
    """k-means on the rows of ``X``, with ``k`` chosen by the silhouette score when not given.

    The silhouette is computed on a random sample of at most ``sample_size`` rows (it is quadratic in
    the number of rows); the final clustering uses all rows.

    Returns
    -------
    ``(labels, k, scores)``: (n,) int64 cluster labels, the ``k`` used and a dict ``{k: silhouette}``
    (empty when ``n_clusters`` was given).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances, silhouette_score

    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n_clusters is not None:
        n_clusters = int(n_clusters)
        if not 1 <= n_clusters <= n:
            raise ValueError(f"n_clusters must be an integer in [1, {n}], got {n_clusters!r}.")
        km = KMeans(n_clusters=n_clusters, n_init=4, random_state=random_state).fit(X)
        return km.labels_.astype(np.int64), n_clusters, {}
    rng = np.random.default_rng(random_state)
    sample = X if n <= sample_size else X[rng.choice(n, sample_size, replace=False)]
    n_distinct = len(np.unique(sample, axis=0))
    scores = {}
    dist = None  # pairwise distances of the sample, computed once for all k
    for k in range(k_range[0], min(k_range[1], n_distinct - 1) + 1):
        km = KMeans(n_clusters=k, n_init=2, random_state=random_state).fit(sample)
        if len(np.unique(km.labels_)) < 2:
            continue
        if dist is None:
            dist = pairwise_distances(sample)
        scores[k] = float(silhouette_score(dist, km.labels_, metric="precomputed"))
    best = max(scores, key=scores.get) if scores else 1
    km = KMeans(n_clusters=best, n_init=4, random_state=random_state).fit(X)
    return km.labels_.astype(np.int64), best, scores
