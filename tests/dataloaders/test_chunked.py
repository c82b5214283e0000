"""cellvi.dataloaders.write_in_chunks: outputs written chunk by chunk equal the in-memory calls."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scvi
from scipy import sparse

import cellvi
from cellvi.dataloaders import write_in_chunks

BATCH = 32  # minibatch size of every get_* call here; chunks are multiples of it


def _seeded(fn, *args, **kwargs):
    scvi.settings.seed = 0
    return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def backed_scar(tmp_path_factory):
    """SCAR set up and trained on a backed (on-disk) AnnData, and the same cells in memory."""
    adata, raw = cellvi.data.simulate_ambient(n_cells=300, n_genes=50, n_empty=600, n_damaged=0, seed=2)
    path = tmp_path_factory.mktemp("chunked") / "cells.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    cellvi.SCAR.setup_anndata(backed)
    cellvi.SCAR.get_ambient_profile(backed, raw)
    scvi.settings.seed = 0
    model = cellvi.SCAR(backed, n_hidden=32, n_latent=4)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    return model


def test_scar_denoised_counts_from_backed_data_equal_in_memory(backed_scar, tmp_path):
    """Sparse int32 counts, appended as CSR chunk by chunk, equal one call with the same seed."""
    model = backed_scar
    assert model.adata.isbacked
    full = _seeded(model.get_denoised_counts, batch_size=BATCH)
    out = tmp_path / "denoised.h5ad"
    _seeded(
        write_in_chunks, model.get_denoised_counts, out, chunk_size=50, batch_size=BATCH, progress_bar=False
    )
    with h5py.File(out) as f:  # stored sparse, as the output
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    written = ad.read_h5ad(out)
    assert sparse.issparse(written.X) and written.X.dtype == np.int32
    assert list(written.obs_names) == list(model.adata.obs_names)
    assert list(written.var_names) == list(model.adata.var_names)
    assert full.nnz > 0 and (written.X != full).nnz == 0
    # the draws are random: another seed gives other counts (so the equality above is not trivial)
    scvi.settings.seed = 1
    assert (model.get_denoised_counts(batch_size=BATCH) != full).nnz > 0


def test_latent_subset_in_order_to_obsm(backed_scar, tmp_path):
    """A latent representation (not per gene) goes to obsm, rows in the order of ``indices``."""
    model = backed_scar
    indices = np.random.default_rng(0).permutation(model.adata.n_obs)[:170]
    full = model.get_latent_representation(indices=indices, batch_size=BATCH)
    out = tmp_path / "latent.h5ad"
    write_in_chunks(
        model.get_latent_representation,
        out,
        "obsm/X_scar",
        indices=indices,
        chunk_size=64,
        batch_size=BATCH,
        progress_bar=False,
    )
    written = ad.read_h5ad(out, backed="r")
    assert list(written.obs_names) == list(model.adata.obs_names[indices])
    np.testing.assert_array_equal(written.obsm["X_scar"], full)
    assert full.shape == (170, 4) and np.isfinite(full).all()
    with pytest.raises(ValueError, match="obsm"):
        write_in_chunks(model.get_latent_representation, tmp_path / "x.h5ad", progress_bar=False)
    assert not (tmp_path / "x.h5ad").exists()  # nothing half-written


def test_bad_arguments_name_themselves(backed_scar, tmp_path):
    model = backed_scar
    out = tmp_path / "bad.h5ad"
    with pytest.raises(ValueError, match="key"):
        write_in_chunks(model.get_denoised_counts, out, "uns/x")
    with pytest.raises(ValueError, match="chunk_size"):
        write_in_chunks(model.get_denoised_counts, out, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        write_in_chunks(np.mean, out)
    with pytest.raises(ValueError, match="indices"):
        write_in_chunks(model.get_denoised_counts, out, indices=[0, 10_000])


@pytest.fixture(scope="module")
def velovi_model():
    from cellvi.velovi import compute_moments, preprocess_data

    adata = cellvi.data.simulate_velocity(n_obs=200, n_vars=12, seed=1)
    compute_moments(adata, n_neighbors=15, normalize=False)
    adata = preprocess_data(adata, filter_on_r2=False)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    scvi.settings.seed = 0
    model = cellvi.VELOVI(adata, n_hidden=16)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    return model


def test_velovi_velocity_to_layer(velovi_model, tmp_path):
    """Dense velocities (a DataFrame with gene columns) into a layer, sampled with the same seed."""
    model = velovi_model
    kwargs = {"n_samples": 3, "batch_size": BATCH, "gene_list": list(model.adata.var_names[:7])}
    full = _seeded(model.get_velocity, **kwargs)
    assert isinstance(full, pd.DataFrame)
    out = tmp_path / "velocity.h5ad"
    _seeded(
        write_in_chunks, model.get_velocity, out, "layers/velocity", chunk_size=40, progress_bar=False,
        **kwargs,
    )
    written = ad.read_h5ad(out)
    assert list(written.var_names) == kwargs["gene_list"]
    np.testing.assert_array_equal(written.layers["velocity"], full.to_numpy())
    assert np.abs(full.to_numpy()).max() > 0
    scvi.settings.seed = 1
    assert not np.array_equal(model.get_velocity(**kwargs).to_numpy(), full.to_numpy())


def test_fadvi_latent_to_obsm(tmp_path):
    """FADVI's latent (one of its representations) to obsm, equal to the in-memory call."""
    adata = cellvi.data.simulate_batches(n_cells=200, n_genes=60, n_batches=2, n_labels=3, seed=0)
    cellvi.FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    scvi.settings.seed = 0
    model = cellvi.FADVI(adata, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    full = model.get_latent_representation(batch_size=BATCH)
    out = tmp_path / "fadvi.h5ad"
    write_in_chunks(
        model.get_latent_representation, out, "obsm/X_fadvi", chunk_size=64, batch_size=BATCH,
        progress_bar=False,
    )
    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["X_fadvi"], full)
    assert np.isfinite(full).all() and full.std() > 0
