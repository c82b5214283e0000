import numpy as np
import pytest
from scipy import sparse

import cellvi
from cellvi.scar._metrics import profile_match


def test_default_prob_works_on_realistic_sizes():
    """2,000 genes and 20,000 low-count empty droplets: the original's G*log(prob) test fails here."""
    adata, raw = cellvi.data.simulate_ambient(n_cells=500, n_genes=2000, n_empty=20000, n_damaged=300, seed=1)
    x_before = raw.X.copy()
    prof = cellvi.SCAR.get_ambient_profile(adata, raw)
    true = adata.varm["ambient_profile_true"][:, 0]
    m = profile_match(prof.iloc[:, 0], true)
    cells = np.asarray(adata.X.sum(0)).ravel()
    naive = profile_match(cells / cells.sum(), true)
    assert m["cosine"] > 0.999 and m["l1"] < 0.06
    assert m["l1"] < naive["l1"] / 2
    np.testing.assert_allclose(adata.varm["ambient_profile"].sum(0), 1.0)
    assert prof.index.equals(adata.var_names)
    # damaged-cell droplets are rejected, most empty ones kept
    assert 19000 < prof.attrs["n_cell_free"]["ambient_profile"] < 20300
    assert (raw.X != x_before).nnz == 0  # raw matrix untouched, still sparse
    assert sparse.issparse(raw.X)


def test_never_uses_cells_and_is_seeded(sim):
    adata, raw = sim
    adata = adata.copy()
    p1 = cellvi.SCAR.get_ambient_profile(adata, raw, sample=1000, seed=5)
    p2 = cellvi.SCAR.get_ambient_profile(adata, raw, sample=1000, seed=5)
    p3 = cellvi.SCAR.get_ambient_profile(adata, raw, sample=1000, seed=6)
    np.testing.assert_array_equal(p1.values, p2.values)
    assert not np.array_equal(p1.values, p3.values)
    # a raw matrix holding only the called cells has no empty droplets: cells are never relabelled
    with pytest.raises(ValueError, match=r"only 0 droplets outside adata.*raw_feature_bc_matrix"):
        cellvi.SCAR.get_ambient_profile(adata, raw[: adata.n_obs].copy())


def test_iterations_zero_and_gene_order(sim):
    adata, raw = sim
    adata = adata.copy()
    raw_shuffled = raw[:, raw.var_names[::-1]].copy()
    p0 = cellvi.SCAR.get_ambient_profile(adata, raw_shuffled, iterations=0)
    p3 = cellvi.SCAR.get_ambient_profile(adata, raw_shuffled)
    true = adata.varm["ambient_profile_true"][:, 0]
    assert profile_match(p3.iloc[:, 0], true)["l1"] < profile_match(p0.iloc[:, 0], true)["l1"]
    assert profile_match(p3.iloc[:, 0], true)["cosine"] > 0.995


def test_per_batch_profiles_from_setup_batch_key():
    adata, raw = cellvi.data.simulate_ambient(n_cells=300, n_genes=100, n_empty=4000, n_batches=2, seed=2)
    cellvi.SCAR.setup_anndata(adata, batch_key="batch")
    prof = cellvi.SCAR.get_ambient_profile(adata, raw)  # batch_key taken from the setup
    true = adata.varm["ambient_profile_true"]
    assert list(prof.columns) == ["batch_0", "batch_1"]
    for j in range(2):
        own = profile_match(prof.iloc[:, j], true[:, j])["l1"]
        other = profile_match(prof.iloc[:, j], true[:, 1 - j])["l1"]
        assert own < 0.1 and own < other / 2


def test_errors_name_the_argument(sim):
    adata, raw = sim
    adata = adata.copy()
    with pytest.raises(ValueError, match=r"raw_adata lacks 5 of the 200 genes"):
        cellvi.SCAR.get_ambient_profile(adata, raw[:, 5:].copy())
    bad = raw.copy()
    bad.X = bad.X.astype(np.float32)
    bad.X[700, 3] = 0.5
    with pytest.raises(ValueError, match=r"raw_adata.X contains non-integer values"):
        cellvi.SCAR.get_ambient_profile(adata, bad)
    with pytest.raises(ValueError, match="prob"):
        cellvi.SCAR.get_ambient_profile(adata, raw, prob=1.5)
    few = raw[: adata.n_obs + 20].copy()
    with pytest.raises(ValueError, match=r"only 20 droplets outside adata.*at least 50"):
        cellvi.SCAR.get_ambient_profile(adata, few)


def test_unknown_raw_layer_is_a_clear_error(sim):
    adata, raw = sim
    with pytest.raises(ValueError, match=r"layer='counts' is not a layer of raw_adata"):
        cellvi.SCAR.get_ambient_profile(adata.copy(), raw, layer="counts")
