"""Bad input, sparse input, training options (warm-up vs early stopping, variants)."""

import numpy as np
import pytest
import scvi
from scipy import sparse

import cellvi


def _small(velo_adata, n_obs=60):
    return velo_adata[:n_obs].copy()


def test_missing_and_bad_layers(velo_adata):
    adata = _small(velo_adata)
    with pytest.raises(ValueError, match="spliced_layer='nope' is not in adata.layers"):
        cellvi.VELOVI.setup_anndata(adata, spliced_layer="nope", unspliced_layer="Mu")
    with pytest.raises(ValueError, match="unspliced_layer"):
        cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer=None)
    bad = adata.copy()
    bad.layers["Mu"][3, 2] = -1.0
    with pytest.raises(ValueError, match=r"adata.layers\['Mu'\].*negative"):
        cellvi.VELOVI.setup_anndata(bad, spliced_layer="Ms", unspliced_layer="Mu")
    bad = adata.copy()
    bad.layers["Ms"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.layers\['Ms'\].*NaN"):
        cellvi.VELOVI.setup_anndata(bad, spliced_layer="Ms", unspliced_layer="Mu")


def test_all_zero_gene_is_named(velo_adata):
    adata = _small(velo_adata)
    adata.layers["Ms"][:, 4] = 0.0
    adata.layers["Mu"][:, 4] = 0.0
    with pytest.raises(ValueError, match="gene_4"):
        cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")


def test_zero_unspliced_gene_initialises_finitely(velo_adata):
    # the original sets alpha = softplus(-inf) (and gamma NaN with gamma_init_data) for such genes
    adata = _small(velo_adata)
    adata.layers["Mu"][:, 2] = 0.0
    adata.layers["Ms"][:, 5] = 0.0
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    model = cellvi.VELOVI(adata, n_hidden=16, gamma_init_data=True)
    for p in model.module.parameters():
        assert np.isfinite(p.detach().numpy()).all()
    rates = model.get_rates()
    assert rates["alpha"][2] > 0 and np.isfinite(rates["gamma"]).all()
    model.train(max_epochs=2, enable_progress_bar=False)
    assert np.isfinite(model.get_velocity().to_numpy()).all()


def test_too_few_cells_and_fewer_than_a_minibatch(velo_adata):
    tiny = velo_adata[:2].copy()
    cellvi.VELOVI.setup_anndata(tiny, spliced_layer="Ms", unspliced_layer="Mu")
    with pytest.raises(ValueError, match="at least 3"):
        cellvi.VELOVI(tiny, n_hidden=16).train(max_epochs=1)
    few = _small(velo_adata, 40)  # fewer cells than batch_size=256: one minibatch
    cellvi.VELOVI.setup_anndata(few, spliced_layer="Ms", unspliced_layer="Mu")
    model = cellvi.VELOVI(few, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert model.get_latent_time().shape == (40, few.n_vars)
    with pytest.raises(ValueError, match="batch_size"):
        model.train(max_epochs=1, batch_size=0)


def test_sparse_layers_match_dense(velo_adata, seeded):
    dense = _small(velo_adata)
    sp = dense.copy()
    sp.layers["Ms"] = sparse.csr_matrix(sp.layers["Ms"])
    sp.layers["Mu"] = sparse.csr_matrix(sp.layers["Mu"])
    models = []
    for adata in (dense, sp):
        cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
        scvi.settings.seed = 0
        models.append(cellvi.VELOVI(adata, n_hidden=16))
    np.testing.assert_allclose(
        models[0].module.switch_unspliced.numpy(), models[1].module.switch_unspliced.numpy()
    )
    np.testing.assert_allclose(
        models[0].module.switch_spliced.numpy(), models[1].module.switch_spliced.numpy()
    )
    models[1].train(max_epochs=2, enable_progress_bar=False)
    v = seeded(models[1].get_velocity, gene_list=["gene_1"], return_numpy=True)
    assert v.shape == (dense.n_obs, 1) and (v >= -dense[:, "gene_1"].layers["Ms"] - 1e-6).all()


def test_switch_estimates_match_the_original_rule(velo_adata):
    from cellvi.velovi._stats import switch_estimates

    u, s = velo_adata.layers["Mu"], velo_adata.layers["Ms"]
    s_up, u_up = switch_estimates(s, u)
    order = np.argsort(u, axis=0)[int(u.shape[0] * 0.99) :]
    np.testing.assert_allclose(u_up, np.median(np.take_along_axis(u, order, 0), 0), rtol=1e-6)
    np.testing.assert_allclose(s_up, np.median(np.take_along_axis(s, order, 0), 0), rtol=1e-6)


def test_warmup_shortened_and_early_stopping_waits_for_it(velo_adata):
    adata = _small(velo_adata, 120)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    model = cellvi.VELOVI(adata, n_hidden=16)
    # patience 1 would stop within a few epochs; it may only count once the 16-epoch warm-up is over
    model.train(max_epochs=20, early_stopping_patience=1, enable_progress_bar=False)
    kl = model.history["kl_weight"].to_numpy().ravel()
    assert len(kl) > 16
    assert kl[-1] == pytest.approx(1.0)
    assert kl[15] < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"linear_decoder": True}, {"time_dep_transcription_rate": True}, {"log_variational": True}],
)
def test_model_variants_train(velo_adata, kwargs, seeded):
    adata = _small(velo_adata, 80)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    model = cellvi.VELOVI(adata, n_hidden=16, **kwargs)
    model.train(max_epochs=3, enable_progress_bar=False)
    v = seeded(model.get_velocity, velo_mode="unspliced").to_numpy()
    assert np.isfinite(v).all()
    if kwargs.get("linear_decoder"):
        assert model.module.get_loadings().shape == (adata.n_vars, 10)
    if kwargs.get("time_dep_transcription_rate"):
        rates = model.get_rates()
        assert (rates["lambda_alpha"] > 0).all()
