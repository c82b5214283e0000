"""Every VELOVI method: shapes, index labels, dtypes, gene_list / indices / return_mean, save/load."""

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi

GENES = ["gene_3", "gene_0", "gene_7"]
IDX = np.array([5, 0, 17, 3])


def _frame(df, obs, var):
    assert isinstance(df, pd.DataFrame)
    assert list(df.index) == list(obs)
    assert list(df.columns) == list(var)
    assert np.issubdtype(df.to_numpy().dtype, np.floating)
    assert np.isfinite(df.to_numpy()).all()


@pytest.mark.parametrize("method", ["get_latent_time", "get_velocity", "get_gene_likelihood"])
def test_cells_by_genes_methods(quick_model, method):
    adata = quick_model.adata
    fn = getattr(quick_model, method)
    _frame(fn(), adata.obs_names, adata.var_names)
    _frame(fn(indices=IDX, gene_list=GENES), adata.obs_names[IDX], GENES)
    samples = fn(indices=IDX, gene_list=GENES, n_samples=3, return_mean=False)
    assert isinstance(samples, np.ndarray) and samples.shape == (3, len(IDX), len(GENES))
    arr = fn(gene_list=GENES, return_numpy=True)
    assert isinstance(arr, np.ndarray) and arr.shape == (adata.n_obs, len(GENES))


def test_expression_fit_and_normalized_expression(quick_model):
    adata = quick_model.adata
    fit_s, fit_u = quick_model.get_expression_fit(indices=IDX, gene_list=GENES)
    _frame(fit_s, adata.obs_names[IDX], GENES)
    _frame(fit_u, adata.obs_names[IDX], GENES)
    s3, u3 = quick_model.get_expression_fit(n_samples=2, return_mean=False, restrict_to_latent_dim=1)
    assert s3.shape == u3.shape == (2, adata.n_obs, adata.n_vars)
    assert (u3 >= 0).all() and (s3 >= 0).all()
    torch.manual_seed(0)
    norm = quick_model.get_normalized_expression(gene_list=GENES)
    torch.manual_seed(0)
    np.testing.assert_allclose(norm.to_numpy(), quick_model.get_expression_fit(gene_list=GENES)[0].to_numpy())
    with pytest.raises(ValueError, match="restrict_to_latent_dim"):
        quick_model.get_expression_fit(restrict_to_latent_dim=99)


def test_state_assignment_shapes(quick_model):
    adata = quick_model.adata
    pi, states = quick_model.get_state_assignment(n_samples=3)
    assert states == ["induction", "induction_steady", "repression", "repression_steady"]
    assert pi.shape == (adata.n_obs, adata.n_vars, 4)
    np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-4)
    pi3, _ = quick_model.get_state_assignment(indices=IDX, gene_list=GENES, n_samples=3, return_mean=False)
    assert pi3.shape == (3, len(IDX), len(GENES), 4)
    hard, _ = quick_model.get_state_assignment(
        indices=IDX, gene_list=GENES, hard_assignment=True, n_samples=3
    )
    assert list(hard.index) == list(adata.obs_names[IDX]) and list(hard.columns) == GENES
    assert set(np.unique(hard.to_numpy())) <= set(states)


def test_velocity_options(quick_model):
    adata = quick_model.adata
    s = adata.layers["Ms"][:, [adata.var_names.get_loc(g) for g in GENES]]
    v = quick_model.get_velocity(gene_list=GENES, clip=True, return_numpy=True)
    assert (v >= -s - 1e-6).all()  # the original broadcasts the clip over all genes and fails here
    vu = quick_model.get_velocity(velo_mode="unspliced", velo_statistic="max", return_numpy=True)
    assert vu.shape == (adata.n_obs, adata.n_vars)
    overall = quick_model.get_velocity(n_samples=5, n_samples_overall=7)
    assert overall.shape == (7, adata.n_vars) and overall.index.isin(adata.obs_names).all()
    t = quick_model.get_latent_time(time_statistic="max", n_samples_overall=6)
    assert t.shape == (6, adata.n_vars)
    assert (t.to_numpy() >= 0).all() and (t.to_numpy() <= 20).all()
    with pytest.raises(ValueError, match="velo_mode"):
        quick_model.get_velocity(velo_mode="both")
    with pytest.raises(ValueError, match="time_statistic"):
        quick_model.get_latent_time(time_statistic="median")
    with pytest.raises(ValueError, match="gene_list"):
        quick_model.get_velocity(gene_list=["not_a_gene"])


def test_rates(quick_model):
    rates = quick_model.get_rates()
    assert set(rates) == {"beta", "gamma", "alpha", "alpha_1", "lambda_alpha"}
    for value in rates.values():
        assert value.shape == (quick_model.adata.n_vars,) and np.isfinite(value).all()
    assert (rates["beta"] > 0).all() and (rates["gamma"] > 0).all()
    np.testing.assert_array_equal(rates["alpha_1"], rates["alpha"])  # constant transcription


def test_inherited_methods(quick_model):
    adata = quick_model.adata
    z = quick_model.get_latent_representation()
    assert z.shape == (adata.n_obs, 10)
    assert np.isfinite(float(quick_model.get_elbo()))
    rec = quick_model.get_reconstruction_error()
    assert np.isfinite(float(rec["reconstruction_loss"]))
    ll = quick_model.get_marginal_ll(indices=IDX, n_mc_samples=20, return_mean=False)
    assert ll.shape == (len(IDX),) and torch.isfinite(ll).all()
    # 100 importance samples tighten the bound: clearly above the ELBO (one sample)
    cells = np.arange(60)
    torch.manual_seed(0)
    ll_mean = quick_model.get_marginal_ll(indices=cells, n_mc_samples=100)
    elbo = float(np.mean([float(quick_model.get_elbo(indices=cells)) for _ in range(5)]))
    assert ll_mean > elbo + 1.0


def test_directional_uncertainty(quick_model):
    adata = quick_model.adata
    df, cos = quick_model.get_directional_uncertainty(n_samples=6, gene_list=GENES, n_jobs=1)
    assert list(df.columns) == [
        "directional_variance",
        "directional_difference",
        "directional_cosine_sim_variance",
        "directional_cosine_sim_difference",
        "directional_cosine_sim_mean",
    ]
    assert list(df.index) == list(adata.obs_names) and cos.shape == (adata.n_obs, 6)
    assert np.isfinite(df.to_numpy()).all() and (np.abs(cos) <= 1).all()
    # the adata argument is honoured (the original recomputes on the training data and mislabels)
    sub = adata[IDX].copy()
    df_sub, cos_sub = quick_model.get_directional_uncertainty(sub, n_samples=6, n_jobs=2)
    assert list(df_sub.index) == list(sub.obs_names) and cos_sub.shape == (len(IDX), 6)


def test_directional_statistics_vectorised_and_zero_safe():
    from cellvi.velovi._stats import directional_statistics

    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 30, 12))
    v[:, 4] = 0.0  # a cell with zero velocity in every sample
    df, cos = directional_statistics(v, n_jobs=1)
    _, cos2 = directional_statistics(v, n_jobs=3)
    np.testing.assert_allclose(cos, cos2)
    assert np.isfinite(df.to_numpy()).all() and (cos[4] == 0).all()
    # reference: a per-cell loop of the centred cosine
    c = 9
    mean = v[:, c].mean(0) - v[:, c].mean()
    for s in range(7):
        x = v[s, c] - v[s, c].mean()
        np.testing.assert_allclose(cos[c, s], x @ mean / np.linalg.norm(x) / np.linalg.norm(mean), rtol=1e-10)
    np.testing.assert_allclose(df["directional_cosine_sim_variance"].iloc[c], cos[c].var())


def test_permutation_scores(quick_model):
    adata = quick_model.adata
    scores, permuted = quick_model.get_permutation_scores(labels_key="cell_type")
    assert list(scores.index) == list(adata.var_names)
    assert sorted(scores.columns) == sorted(adata.obs["cell_type"].astype(str).unique())
    assert np.isfinite(scores.to_numpy()).all()
    assert permuted.shape == adata.shape
    # values are shuffled within cell types: same multiset per type and gene, different order
    for ct in adata.obs["cell_type"].unique()[:2]:
        rows = np.flatnonzero(adata.obs["cell_type"] == ct)
        a, b = adata.layers["Ms"][rows], permuted.layers["Ms"][rows]
        np.testing.assert_allclose(np.sort(a, axis=0), np.sort(b, axis=0))
        assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="labels_key"):
        quick_model.get_permutation_scores(labels_key="nope")


def test_permutation_scores_fit_only_the_tested_cells(quick_model, monkeypatch):
    # the t-tests use at most max_cells cells per type: only those are fitted, and the scores equal the
    # t-tests of the errors of a fit of every cell (posterior means in place of samples: deterministic)
    from scipy.stats import ttest_ind

    from cellvi.velovi._stats import permute_within_groups, sample_group_rows

    adata = quick_model.adata
    monkeypatch.setattr(
        torch.distributions.Normal, "sample", lambda self, shape=(): self.loc.expand(*shape, *self.loc.shape)
    )
    calls = []
    posterior = quick_model._posterior

    def recording(data, indices, *args, **kwargs):
        calls.append(np.asarray(indices))
        return posterior(data, indices, *args, **kwargs)

    monkeypatch.setattr(quick_model, "_posterior", recording)
    groups = np.asarray(adata.obs["cell_type"].astype(str))
    max_cells = 20
    scores, permuted = quick_model.get_permutation_scores(labels_key="cell_type", max_cells=max_cells, seed=3)
    n_tested = sum(min(max_cells, int((groups == g).sum())) for g in np.unique(groups))
    assert [len(c) for c in calls] == [n_tested, n_tested]

    rng = np.random.default_rng(3)  # the same draws: the permutation, then the tested cells
    for layer in ("Ms", "Mu"):
        np.testing.assert_array_equal(
            permute_within_groups(adata.layers[layer], groups, rng), permuted.layers[layer]
        )
    rows = sample_group_rows(groups, max_cells, rng)

    def error(data):
        fs, fu = quick_model.get_expression_fit(data, n_samples=1)
        return np.abs(np.asarray(fs) - data.layers["Ms"]) + np.abs(np.asarray(fu) - data.layers["Mu"])

    full_orig, full_perm = error(adata), error(permuted)
    for g, r in rows.items():
        expect = ttest_ind(full_perm[r], full_orig[r], axis=0).statistic
        np.testing.assert_allclose(scores[g].to_numpy(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_permutation_scores_rank_trained_genes(trained):
    # on a trained model, permuting breaks the kinetics: errors rise, so scores are mostly positive
    scores, _ = trained.get_permutation_scores(labels_key="cell_type")
    assert (scores.max(axis=1) > 2).mean() > 0.8


def test_outputs_identical_twice_and_after_save_load(quick_model, tmp_path, seeded):
    first = seeded(quick_model.get_velocity, n_samples=2)
    second = seeded(quick_model.get_velocity, n_samples=2)
    pd.testing.assert_frame_equal(first, second)
    quick_model.save(tmp_path / "m", save_anndata=True)
    loaded = cellvi.VELOVI.load(tmp_path / "m")
    pd.testing.assert_frame_equal(first, seeded(loaded.get_velocity, n_samples=2))
    pd.testing.assert_frame_equal(seeded(quick_model.get_latent_time), seeded(loaded.get_latent_time))
    for key, value in quick_model.get_rates().items():
        np.testing.assert_array_equal(value, loaded.get_rates()[key])


def test_aggregated_posterior_differential_abundance_and_sample(quick_model):
    adata = quick_model.adata
    post = quick_model.get_aggregated_posterior(indices=np.arange(30))
    assert post.sample().shape[-1] == 10
    data = adata.copy()
    quick_model.differential_abundance(data, sample_key="cell_type")  # writes obsm['da_log_probs']
    da = data.obsm["da_log_probs"]
    assert da.shape == (adata.n_obs, 4) and np.isfinite(da.to_numpy()).all()
    tensors = {"X": torch.as_tensor(adata.layers["Ms"][:8]), "U": torch.as_tensor(adata.layers["Mu"][:8])}
    s, u = quick_model.module.sample(tensors, n_samples=3)
    assert s.shape == u.shape == (3, 8, adata.n_vars)


def test_other_genes_are_rejected(quick_model):
    other = quick_model.adata[:, :5].copy()
    with pytest.raises(ValueError):
        quick_model.get_velocity(adata=other)


def test_posterior_passes_fill_every_sample_and_cell(quick_model, monkeypatch):
    # samples drawn one pass at a time, several minibatches, a subset of cells: the same values as one
    # pass per minibatch. The latent draws are made deterministic (sample k of a minibatch is
    # loc + 0.1 k scale, whatever the passes), so the expected velocities must agree exactly
    import cellvi.velovi._model as velovi_model

    def sample(self, shape=()):
        k = getattr(self, "_drawn", 0)
        self._drawn = k + shape[0]
        c = torch.arange(k, k + shape[0], dtype=self.loc.dtype).view(-1, *[1] * self.loc.dim())
        return self.loc + 0.1 * c * self.scale

    monkeypatch.setattr(torch.distributions.Normal, "sample", sample)
    idx = np.arange(0, quick_model.adata.n_obs, 3)

    def velocity():
        return quick_model.get_velocity(indices=idx, n_samples=3, batch_size=7, return_numpy=True)

    expected = velocity()
    monkeypatch.setattr(velovi_model, "_SAMPLE_BLOCK", 1)
    np.testing.assert_allclose(velocity(), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(expected[:7], expected[7:14])  # the cells are not all alike
