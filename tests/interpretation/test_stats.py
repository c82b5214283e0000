"""Unit tests of the interpretation statistics on synthetic arrays (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cellvi.interpretation import stats as st


def test_bh_matches_statsmodels_and_keeps_nans():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-4, size=20)])
    expected = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(st.bh_adjust(p), expected, rtol=1e-10)
    # along an axis, each row its own family; NaNs ignored and kept
    q = np.stack([p[:100], p[100:200]])
    q[1, 5] = np.nan
    adj = st.bh_adjust(q, axis=1)
    np.testing.assert_allclose(adj[0], multipletests(q[0], method="fdr_bh")[1], rtol=1e-10)
    ok = ~np.isnan(q[1])
    np.testing.assert_allclose(adj[1, ok], multipletests(q[1, ok], method="fdr_bh")[1], rtol=1e-10)
    assert np.isnan(adj[1, 5])
    with pytest.raises(ValueError, match="pvalues"):
        st.bh_adjust([0.5, 1.5])


def test_bh_in_log_space_keeps_tiny_pvalues_apart():
    nl10 = np.array([400.0, 350.0, 2.0, 0.1])  # p = 1e-400 cannot be represented as a float
    adj = st.bh_adjust_nl10(nl10)
    np.testing.assert_allclose(adj, [400 - np.log10(4), 350 - np.log10(2), 2 - np.log10(4 / 3), 0.1])
    assert adj[0] > adj[1] > adj[2] > adj[3] >= 0


def test_permutation_pvalue_has_plus_one_correction():
    assert st.permutation_pvalue(0, 99) == pytest.approx(0.01)
    assert st.permutation_pvalue(99, 99) == 1.0
    assert np.all(st.permutation_pvalue(np.arange(5), 4) > 0)
    # enough permutations that the smallest p passes a Bonferroni split of alpha
    n = st.min_permutations(32, 0.05)
    assert 1 / (n + 1) < 0.05 / 32 and 1 / n >= 0.05 / 32
    with pytest.raises(ValueError, match="n_permutations"):
        st.permutation_pvalue(0, 0)
    with pytest.raises(ValueError, match="alpha"):
        st.min_permutations(4, 1.5)


def test_permutation_test_is_calibrated_under_the_null():
    # the +1 correction makes P(p <= a) <= a for exchangeable statistics
    rng = np.random.default_rng(1)
    n_perm, n_tests = 19, 4000
    t = rng.normal(size=(n_tests, n_perm + 1))
    p = st.permutation_pvalue((t[:, 1:] >= t[:, :1]).sum(1), n_perm)
    assert p.min() > 0
    assert np.mean(p <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / n_tests)
    assert np.mean(p <= 0.05) >= 0.05 - 3 * np.sqrt(0.05 * 0.95 / n_tests)


def test_streaming_correlation_z_and_pvalues():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 4))
    a = x * np.array([0.0, 0.2, -0.5, 1.0]) + rng.normal(size=(500, 4))
    acc = st.StreamingCorrelation()
    for s in range(0, 500, 64):
        acc.update(a[s : s + 64], x[s : s + 64])
    r = acc.result()
    for j in range(4):
        res = stats.pearsonr(a[:, j], x[:, j])
        assert r[j] == pytest.approx(res.statistic, abs=1e-10)
        z = st.correlation_to_z(r[j], 500)
        # the t statistic of the correlation, read as a normal deviate
        assert z == pytest.approx(r[j] * np.sqrt(498) / np.sqrt(1 - r[j] ** 2))
        p_two = 10 ** -st.z_to_nl10_pvalue(z)
        assert p_two == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-8)
    assert st.z_to_nl10_pvalue(-3.0, "greater") < 0.01 < st.z_to_nl10_pvalue(-3.0, "less")
    # far tail: no 1e-8 floor
    assert st.z_to_nl10_pvalue(40.0) > 300
    const = st.StreamingCorrelation()
    const.update(np.ones((10, 1)), rng.normal(size=(10, 1)))
    assert np.isnan(const.result()[0])
    with pytest.raises(ValueError, match="alternative"):
        st.z_to_nl10_pvalue(1.0, "both")


def test_bootstrap_ci_covers_the_true_median_per_group():
    rng = np.random.default_rng(3)
    n_groups, n = 60, 80
    values = rng.normal(10.0, 2.0, size=(n_groups, n))
    groups = np.repeat(np.arange(n_groups), n)
    ci = st.bootstrap_ci(values.ravel(), groups, n_bootstrap=2000, random_state=0)
    assert list(ci.columns) == ["n", "estimate", "ci_low", "ci_high"]
    assert (ci["n"] == n).all() and ci["n"].dtype == np.int64
    assert (ci["ci_low"] <= ci["estimate"]).all() and (ci["estimate"] <= ci["ci_high"]).all()
    coverage = np.mean((ci["ci_low"] <= 10.0) & (10.0 <= ci["ci_high"]))
    assert 0.8 <= coverage <= 1.0
    # deterministic under a seed; small memory chunks give the same answer
    again = st.bootstrap_ci(values.ravel(), groups, n_bootstrap=2000, random_state=0, max_elements=1000)
    assert np.isfinite(again.to_numpy()).all()
    np.testing.assert_allclose(
        st.bootstrap_ci(values.ravel(), groups, n_bootstrap=2000, random_state=0).to_numpy(), ci.to_numpy()
    )
    with pytest.raises(ValueError, match="statistic"):
        st.bootstrap_ci(values.ravel(), statistic="mode")


def test_kmeans_silhouette_finds_the_number_of_blobs_on_a_sample():
    rng = np.random.default_rng(4)
    centres = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])
    X = centres[rng.integers(0, 3, 6000)] + rng.normal(0, 0.05, size=(6000, 3))
    labels, k, scores = st.kmeans_silhouette(X, sample_size=800, random_state=0)
    assert k == 3 and set(scores) >= {2, 3, 4}
    assert labels.shape == (6000,) and labels.dtype == np.int64 and len(np.unique(labels)) == 3
    labels2, k2, scores2 = st.kmeans_silhouette(X, n_clusters=5, random_state=0)
    assert k2 == 5 and scores2 == {} and len(np.unique(labels2)) == 5
    with pytest.raises(ValueError, match="n_clusters"):
        st.kmeans_silhouette(X, n_clusters=0)


def test_explained_variance_permutation_shortcut_equals_brute_force_mse():
    import torch

    from cellvi.interpretation._explained_variance import _permutation_pvalues

    rng = np.random.default_rng(5)
    n, H, G, n_perm = 40, 3, 6, 50
    x = rng.normal(size=(n, G))
    # head 0 predicts x well, head 1 weakly, head 2 not at all
    r = np.stack([x + 0.3 * rng.normal(size=(n, G)), 0.2 * x + rng.normal(size=(n, G)), rng.normal(size=(n, G))], 1)
    const = rng.normal(size=G)
    labels = np.zeros(n, dtype=np.int64)
    proj_r = torch.as_tensor(r, dtype=torch.float32)
    proj_x = torch.as_tensor(x, dtype=torch.float32)[:, None, :].expand(n, H, G).contiguous()
    p_gram = _permutation_pvalues(proj_r, proj_x, labels, 1, n_perm, 7, False)
    # max_elements=1000: no (H, n, n) matrix, one permutation per chunk
    p_gather = _permutation_pvalues(proj_r, proj_x, labels, 1, n_perm, 7, False, max_elements=1000)

    def brute(chunk):  # the MSE of row-shuffled predictions, with the same permutations
        gen = torch.Generator().manual_seed(7)
        perm = np.concatenate([torch.argsort(torch.rand(min(chunk, n_perm - s), n, generator=gen), dim=1).numpy()
                               for s in range(0, n_perm, chunk)])
        pred = const + r  # (n, H, G)
        mse_obs = ((pred - x[:, None, :]) ** 2).mean((0, 2))
        mse_perm = ((pred[perm] - x[None, :, None, :]) ** 2).mean((1, 3))  # (n_perm, H)
        return (1 + (mse_perm <= mse_obs[None] + 1e-9).sum(0)) / (1 + n_perm)

    np.testing.assert_allclose(p_gram[0], brute(n_perm))
    # a random subset of the cells: still a valid test, p-values from the same permutation grid
    p_sub = _permutation_pvalues(proj_r, proj_x, labels, 1, n_perm, 7, False, max_cells=20)
    assert p_sub[0, 0] == pytest.approx(1 / 51) and np.allclose(p_sub * 51, np.round(p_sub * 51))
    np.testing.assert_allclose(p_gather[0], brute(1))
    assert p_gram[0, 0] == pytest.approx(1 / 51) and p_gram[0, 2] > 0.05


def test_docstring_examples_run():
    import doctest

    import logging

    import scvi

    import cellvi.interpretation
    import cellvi.interpretation._stats

    verbosity = scvi.settings.verbosity
    scvi.settings.verbosity = logging.WARNING  # scvi's INFO lines go to stdout, which doctest compares
    try:
        for mod in (cellvi.interpretation._stats, cellvi.interpretation):
            result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            assert result.attempted > 0 and result.failed == 0, mod.__name__
    finally:
        scvi.settings.verbosity = verbosity
