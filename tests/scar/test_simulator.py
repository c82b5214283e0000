import numpy as np
import pytest

import cellvi


def test_truth_adds_up_and_is_seeded():
    a1, r1 = cellvi.data.simulate_ambient(n_cells=200, n_genes=80, n_empty=1000, n_damaged=20, seed=3)
    a2, _ = cellvi.data.simulate_ambient(n_cells=200, n_genes=80, n_empty=1000, n_damaged=20, seed=3)
    a3, _ = cellvi.data.simulate_ambient(n_cells=200, n_genes=80, n_empty=1000, n_damaged=20, seed=4)
    assert (a1.X != a2.X).nnz == 0 and (a1.X != a3.X).nnz > 0
    assert (a1.X - a1.layers["native"] - a1.layers["ambient"]).nnz == 0
    np.testing.assert_allclose(a1.varm["ambient_profile_true"].sum(0), 1.0)
    assert r1.n_obs == 200 + 1000 + 20 and list(r1.obs_names[:200]) == list(a1.obs_names)
    assert set(r1.obs["droplet_type"]) == {"cell", "empty", "damaged"}
    tot = np.asarray(r1.X.sum(1)).ravel()
    # empty droplets are low-count, damaged ones in between, cells highest
    assert np.median(tot[r1.obs["droplet_type"] == "empty"]) < np.median(
        tot[r1.obs["droplet_type"] == "damaged"]
    )
    assert np.median(tot[r1.obs["droplet_type"] == "damaged"]) < np.median(tot[:200])
    # realised contamination follows the per-cell parameter
    assert np.corrcoef(a1.obs["contamination"], a1.obs["ambient_fraction"])[0, 1] > 0.9
    # native programs are sparse; ambient is a mixture of the types (correlated with the cell mean)
    assert (a1.layers["native"].toarray() == 0).mean() > 0.3
    cell_mean = np.asarray(a1.layers["native"].sum(0)).ravel()
    assert np.corrcoef(cell_mean, a1.varm["ambient_profile_true"][:, 0])[0, 1] > 0.5


def test_batches_have_their_own_profiles():
    a, r = cellvi.data.simulate_ambient(n_cells=200, n_genes=80, n_empty=1000, n_batches=2, seed=0)
    prof = a.varm["ambient_profile_true"]
    assert prof.shape == (80, 2) and np.abs(prof[:, 0] - prof[:, 1]).sum() > 0.05
    assert list(a.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert set(r.obs["batch"]) == {"batch_0", "batch_1"}


def test_guides_one_feature_per_cell():
    a, _ = cellvi.data.simulate_ambient(n_cells=300, n_genes=12, n_empty=500, modality="guides", seed=0)
    single = a.obs["guide"].str.len().gt(0) & ~a.obs["guide"].str.contains(r"\+")
    nat = a.layers["native"].toarray()
    assert ((nat[single.to_numpy()] > 0).sum(1) == 1).all()
    top = np.asarray(a.var_names)[nat[single.to_numpy()].argmax(1)]
    assert (top == a.obs["guide"][single].to_numpy()).all()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"contamination": 1.5}, "contamination"),
        ({"modality": "atac"}, "modality"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        cellvi.data.simulate_ambient(**kw)


def test_simulate_batches_truth():
    """simulate_batches (cellvi.data, used by FADVI): seeded; unlabeled fraction; residual independent of batch and type."""
    a1 = cellvi.data.simulate_batches(n_cells=1500, n_genes=120, seed=3)
    a2 = cellvi.data.simulate_batches(n_cells=1500, n_genes=120, seed=3)
    a3 = cellvi.data.simulate_batches(n_cells=1500, n_genes=120, seed=4)
    assert (a1.X != a2.X).nnz == 0 and (a1.X != a3.X).nnz > 0
    unl = (a1.obs["labels"] == "Unknown").to_numpy()
    assert abs(unl.mean() - 0.3) < 0.05 and (unl == ~a1.obs["is_labeled"].to_numpy()).all()
    lab = ~unl
    assert (a1.obs["labels"][lab].astype(str) == a1.obs["cell_type"][lab].astype(str)).all()
    r = a1.obs["residual"].to_numpy()
    for key in ("batch", "cell_type"):  # group means of r are within sampling noise of 0
        means = a1.obs.groupby(key, observed=True)["residual"].agg(["mean", "size"])
        assert (means["mean"].abs() < 4 / np.sqrt(means["size"])).all(), key
    # the residual genes follow r; the batch effect moves expression between batches
    x = np.log1p(a1.X.toarray() / a1.X.sum(1).A * 1e4)
    w = a1.var["residual_loading"].to_numpy() * a1.var["residual_gene"].to_numpy(bool)
    assert np.corrcoef((x - x.mean(0)) @ w, r)[0, 1] > 0.5
    assert np.abs(a1.varm["batch_effect"]).max() > 0.5
