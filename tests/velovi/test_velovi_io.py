"""Preprocessing without scVelo, the scVelo/CellRank export, and the `cellvi velovi` command."""

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import cellvi
from cellvi._cli import main
from cellvi.velovi import compute_moments, preprocess_data, write_velovi_results
from cellvi.velovi._preprocess import steady_state_fit


def test_moments_smooth_towards_truth():
    adata = cellvi.data.simulate_velocity(n_obs=300, n_vars=10, seed=2, sparse=True)
    before = {k: v.copy() for k, v in adata.layers.items()}
    out = compute_moments(adata, n_neighbors=15, normalize=False)
    assert out is adata
    for key in ("spliced", "unspliced"):  # inputs untouched, still sparse
        assert sparse.issparse(adata.layers[key])
        assert (adata.layers[key] != before[key]).nnz == 0
    ms = adata.layers["Ms"]
    assert isinstance(ms, np.ndarray) and ms.dtype == np.float32 and ms.shape == (300, 10)
    truth = adata.layers["true_spliced"]
    raw = adata.layers["spliced"].toarray()
    corr = lambda x: np.median([np.corrcoef(x[:, g], truth[:, g])[0, 1] for g in range(10)])
    assert corr(ms) > corr(raw) + 0.05
    assert adata.obsp["velovi_connectivities"].shape == (300, 300)
    with pytest.raises(ValueError, match="spliced_layer='x'"):
        compute_moments(adata, spliced_layer="x")


def test_preprocess_scales_filters_and_keeps_input(velo_adata):
    raw = cellvi.data.simulate_velocity(n_obs=200, n_vars=12, seed=5)
    compute_moments(raw, n_neighbors=15, normalize=False)
    raw.layers["Mu"][:, 0] = 0.0  # no unspliced signal: fails the steady-state filter
    raw.layers["Ms"][:, 1] = 0.0
    raw.layers["Mu"][:, 1] = 0.0  # empty gene: always removed
    ms_before = raw.layers["Ms"].copy()
    out = preprocess_data(raw)
    np.testing.assert_array_equal(raw.layers["Ms"], ms_before)
    assert "gene_0" not in out.var_names and "gene_1" not in out.var_names
    assert out.var["velocity_genes"].all() and (out.var["velocity_r2"] > 0).all()
    for layer in ("Ms", "Mu"):
        x = out.layers[layer]
        np.testing.assert_allclose(x.min(0), 0, atol=1e-6)
        np.testing.assert_allclose(x.max(0), 1, atol=1e-6)
    kept = ms_before[:, raw.var_names.get_indexer(out.var_names)]
    np.testing.assert_allclose(out.var["velovi_spliced_range"], kept.max(0) - kept.min(0), rtol=1e-5)
    kept_all = preprocess_data(raw, filter_on_r2=False, min_max_scale=False)
    assert kept_all.n_vars == raw.n_vars - 1


def test_steady_state_fit_recovers_gamma_over_beta():
    adata = cellvi.data.simulate_velocity(n_obs=2000, n_vars=15, seed=0)
    fit = steady_state_fit(adata.layers["true_spliced"], adata.layers["true_unspliced"])
    ratio = adata.var["true_gamma"] / adata.var["true_beta"]
    assert np.corrcoef(fit["velocity_gamma"], ratio)[0, 1] > 0.9


def _check_export(adata, n_obs, n_vars):
    for layer in ("velocity", "velocity_u", "fit_t", "latent_time_velovi", "Ms", "Mu"):
        assert adata.layers[layer].shape == (n_obs, n_vars)
    for layer in ("velocity", "velocity_u", "fit_t"):
        assert adata.layers[layer].dtype == np.float32 and np.isfinite(adata.layers[layer]).all()
    assert 0 <= adata.layers["fit_t"].min() and adata.layers["fit_t"].max() <= 20 + 1e-4
    for col in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling"):
        assert adata.var[col].dtype == np.float64 and np.isfinite(adata.var[col]).all()
    assert adata.var["velocity_genes"].dtype == bool
    for col in ("velovi_latent_time", "velocity_uncertainty", "directional_cosine_sim_variance"):
        assert adata.obs[col].dtype == np.float64 and np.isfinite(adata.obs[col]).all()
    assert adata.obs["velovi_latent_time"].between(0, 1).all()
    assert adata.uns["velocity_params"]["mode"] == "velovi"


def test_write_velovi_results_fields(quick_model):
    adata = quick_model.adata.copy()
    out = write_velovi_results(quick_model, adata, n_samples=3)
    assert out is adata
    _check_export(adata, *adata.shape)
    # velocity = model velocity / (20 / max t); fit_t = t * scaling
    t = adata.layers["latent_time_velovi"]
    np.testing.assert_allclose(adata.layers["fit_t"], t * (20 / t.max(0)), rtol=1e-5)
    scaled = write_velovi_results(
        quick_model, adata.copy(), n_samples=3, uncertainty=False, unscaled_rates=True
    )
    r = quick_model.get_rates()
    ratio = scaled.var["fit_gamma"] / scaled.var["fit_beta"]
    expected = (
        r["gamma"] / r["beta"] * adata.var["velovi_unspliced_range"] / adata.var["velovi_spliced_range"]
    )
    np.testing.assert_allclose(ratio, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="unscaled_rates"):
        bare = adata.copy()
        del bare.var["velovi_spliced_range"]
        write_velovi_results(quick_model, bare, unscaled_rates=True)


def test_cli_round_trip(tmp_path, capsys):
    adata = cellvi.data.simulate_velocity(n_obs=150, n_vars=8, seed=0)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    code = main(
        [
            "velovi",
            str(path),
            "-o",
            str(out),
            "--max-epochs",
            "3",
            "--no-normalize",
            "--no-filter",
            "--n-samples",
            "3",
            "--n-neighbors",
            "10",
            "--quiet",
        ]
    )
    assert code == 0
    result = ad.read_h5ad(out)
    _check_export(result, 150, 8)
    assert main(["velovi", str(tmp_path / "missing.h5ad"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
