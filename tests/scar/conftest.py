"""Shared SCAR fixtures: one small simulation and one trained model per session."""

import numpy as np
import pytest
import scvi

import cellvi


@pytest.fixture(scope="session")
def sim():
    adata, raw = cellvi.data.simulate_ambient(n_cells=600, n_genes=200, n_empty=3000, n_damaged=100, seed=0)
    return adata, raw


@pytest.fixture(scope="session")
def trained(sim):
    """(adata, raw, model): SCAR with the estimated ambient profile, 150 epochs."""
    adata, raw = sim
    adata = adata.copy()
    scvi.settings.seed = 0
    cellvi.SCAR.setup_anndata(adata)
    cellvi.SCAR.get_ambient_profile(adata, raw)
    model = cellvi.SCAR(adata)
    model.train(max_epochs=150, enable_progress_bar=False)
    return adata, raw, model


def _small(n_cells=120, n_genes=40, seed=1, **kw):
    return cellvi.data.simulate_ambient(n_cells=n_cells, n_genes=n_genes, n_empty=600, n_damaged=10, seed=seed, **kw)


@pytest.fixture
def small():
    """Factory of small simulations: ``small(n_cells=..., seed=..., **simulate_ambient_kwargs)``."""
    return _small


@pytest.fixture
def rng():
    return np.random.default_rng(0)
