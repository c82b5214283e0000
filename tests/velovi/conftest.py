"""Shared VELOVI fixtures: one small simulated data set, preprocessed, and one model trained once."""

import numpy as np
import pytest
import scvi

import cellvi
from cellvi.velovi import compute_moments, preprocess_data

N_OBS, N_VARS = 400, 20


@pytest.fixture(scope="session")
def velo_adata():
    """400 cells x 20 genes: moments (no total-count normalisation: the genes are co-regulated), scaled."""
    adata = cellvi.data.simulate_velocity(n_obs=N_OBS, n_vars=N_VARS, seed=1)
    compute_moments(adata, n_neighbors=20, normalize=False)
    return preprocess_data(adata, filter_on_r2=False)


@pytest.fixture(scope="session")
def trained(velo_adata):
    """A VELOVI trained long enough to recover the truth (the KL warm-up ends at epoch 120)."""
    adata = velo_adata.copy()
    scvi.settings.seed = 0
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    model = cellvi.VELOVI(adata)
    model.train(max_epochs=150, enable_progress_bar=False)
    return model


@pytest.fixture(scope="session")
def quick_model(velo_adata):
    """A briefly trained VELOVI for shape / API tests."""
    adata = velo_adata.copy()
    scvi.settings.seed = 0
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    model = cellvi.VELOVI(adata, n_hidden=32)
    model.train(max_epochs=3, enable_progress_bar=False)
    return model


def _seeded(fn, *args, seed=0, **kwargs):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    return fn(*args, **kwargs)


@pytest.fixture(scope="session")
def seeded():
    """``seeded(fn, *args, **kwargs)`` calls ``fn`` with torch's generator seeded (posterior sampling is random)."""
    return _seeded
