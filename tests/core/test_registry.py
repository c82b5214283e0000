"""Inherited registry methods of the reference pages work for every model (scvi-tools 1.4 breaks them)."""

import pytest

import cellvi


def _scar():
    adata, _ = cellvi.data.simulate_ambient(n_cells=60, n_genes=20, n_empty=300, seed=0)
    cellvi.SCAR.setup_anndata(adata)
    return cellvi.SCAR(adata, ambient_profile=None)


def _velovi():
    adata = cellvi.data.simulate_velocity(n_obs=60, n_vars=10, seed=0)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="spliced", unspliced_layer="unspliced")
    return cellvi.VELOVI(adata)


def _fadvi():
    adata = cellvi.data.simulate_batches(n_cells=60, n_genes=20, seed=0)
    cellvi.FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels", unlabeled_category="Unknown")
    return cellvi.FADVI(adata)


def _amici():
    adata = cellvi.data.simulate_spatial(n_cells=160, n_genes=50, seed=0)
    cellvi.AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=5)
    return cellvi.AMICI(adata, n_heads=2, n_head_size=4, n_nn_embed=8, n_nn_embed_hidden=8)


@pytest.mark.parametrize("build", [_scar, _velovi, _fadvi, _amici], ids=["scar", "velovi", "fadvi", "amici"])
def test_registry_methods_work(build, capsys):
    model = build()
    model.view_anndata_setup(hide_state_registries=True)
    model.view_registry()
    model.view_registry(hide_state_registries=True)
    assert "Anndata setup with scvi-tools version" in capsys.readouterr().out
    model.update_setup_method_args({"extra_note": 1})
    assert model.registry_["setup_args"]["extra_note"] == 1
    with pytest.raises(TypeError, match="setup_method_args must be a dict"):
        model.update_setup_method_args([("a", 1)])
