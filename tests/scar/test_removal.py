"""The number of counts removed per entry: the largest r with P(A >= r | x) >= threshold, A ~ Binomial(x, q)."""

import numpy as np
import pytest
import torch
from scipy import stats

from cellvi.scar._removal import _tables, ambient_counts_to_remove


def _exact(x, q, tau):
    r = np.zeros_like(x)
    for i, (n, p) in enumerate(zip(x, q, strict=True)):
        k = np.arange(1, int(n) + 1)
        r[i] = (stats.binom.sf(k - 1, n, p) >= tau).sum()
    return r


@pytest.mark.parametrize("tau", [0.5, 0.17, 0.9, 1e-3, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_binomial_posterior(tau, dtype, rng):
    x = np.concatenate(
        [rng.integers(0, 8, 3000), rng.integers(0, 300, 600), [0, 1, 5, 64, 65, 256, 257, 900]]
    )
    q = rng.random(x.size)
    q[:200] = 0.0
    q[200:400] = 1.0
    q[-8:] = 0.37
    x, q = x.astype(float), q.astype(np.float32).astype(float)  # the same q for both sides
    got = ambient_counts_to_remove(torch.tensor(x, dtype=dtype), torch.tensor(q, dtype=dtype), tau).numpy()
    want = _exact(x, q, tau)
    assert got.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    exact = x <= 64
    # float32 thresholds may flip a count where q sits on one (none here at float64)
    assert (got[exact] != want[exact]).mean() < (1e-3 if dtype == torch.float32 else 1e-12)
    # Cornish-Fisher above 64 counts: at most a count off, rarely (up to four for extreme thresholds)
    diff = np.abs(got[~exact] - want[~exact])
    assert diff.max() <= (4 if tau < 0.01 else 1) and (diff > 0).mean() < (0.5 if tau < 0.01 else 0.02)
    assert ((got >= 0) & (got <= x)).all()
    np.testing.assert_array_equal(got[q == 0], 0)
    np.testing.assert_array_equal(got[q == 1], x[q == 1])


def test_extreme_thresholds_walk_to_the_exact_count():
    """At 1e-6 the 4096 bins of q are too coarse for the thresholds (no lookup): the exact walk is used."""
    assert _tables(1e-6)[1] is None and _tables(0.17)[1] is not None


def test_broadcasts_and_keeps_the_shape(rng):
    x = torch.tensor(rng.poisson(2.0, (3, 5, 7)), dtype=torch.float32)
    q = torch.rand(3, 1, 7)
    r = ambient_counts_to_remove(x, q, 0.5)
    assert r.shape == x.shape and (r <= x).all()
    # the posterior median: r is 0 or 1 for a single count, 1 exactly when q >= 1/2
    one = torch.ones(4)
    np.testing.assert_array_equal(
        ambient_counts_to_remove(one, torch.tensor([0.2, 0.49, 0.5, 0.8]), 0.5), [0, 0, 1, 1]
    )
