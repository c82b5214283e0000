"""cellvi.FADVI on cellvi.data.simulate_batches: disentanglement, prediction, the full API, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.data import simulate_batches
from cellvi.fadvi import FADVI, evaluate_disentanglement

QUIET = {"enable_progress_bar": False}
SMALL = {"n_latent_b": 6, "n_latent_l": 8, "n_latent_r": 4, "n_hidden": 64}


@pytest.fixture(scope="module")
def trained():
    import scvi

    scvi.settings.seed = 0
    adata = simulate_batches(
        n_cells=1200, n_genes=200, n_batches=3, n_labels=4, composition_concentration=None, seed=1
    )
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata, **SMALL)
    model.train(max_epochs=30, batch_size=128, **QUIET)
    return model, adata


@pytest.fixture(scope="module")
def probes(trained):
    model, adata = trained
    return evaluate_disentanglement(model, labels_key="cell_type", continuous_keys=["residual"]).set_index(
        ["latent", "target"]
    )


def test_unlabeled_cells_predicted(trained):
    model, adata = trained
    pred = model.predict()
    unl = ~adata.obs["is_labeled"].to_numpy()
    acc = np.mean(pred[unl] == adata.obs["cell_type"].to_numpy()[unl])
    assert acc > 0.9, acc
    assert set(pred) <= set(adata.obs["cell_type"].cat.categories)


def test_batch_and_label_leakage_near_chance(probes):
    # the supervised blocks hold their factor ...
    assert probes.loc[("z_b", "batch"), "score"] > 0.95
    assert probes.loc[("z_l", "label"), "score"] > 0.95
    # ... and far less of the other one (chance 1/3 for batch, 1/4 for label)
    assert probes.loc[("z_l", "batch"), "score"] < 0.6, probes.loc[("z_l", "batch")]
    assert probes.loc[("z_b", "label"), "score"] < 0.6, probes.loc[("z_b", "label")]
    assert probes.loc[("z_r", "batch"), "score"] < 0.6, probes.loc[("z_r", "batch")]
    assert probes.loc[("z_r", "label"), "score"] < 0.6, probes.loc[("z_r", "label")]


def test_residual_program_in_z_r_not_z_b(probes):
    r2_r = probes.loc[("z_r", "residual"), "score"]
    r2_b = probes.loc[("z_b", "residual"), "score"]
    assert r2_r > 0.85, r2_r
    assert r2_b < 0.3, r2_b
    assert probes.loc[("z_l", "residual"), "score"] < 0.3


def test_latent_shapes_and_determinism(trained):
    model, adata = trained
    for rep, d in (("full", 18), ("b", 6), ("batch", 6), ("l", 8), ("label", 8), ("r", 4), ("lr", 12)):
        z = model.get_latent_representation(representation=rep)
        assert z.shape == (adata.n_obs, d)
        assert z.dtype == np.float32
    z1 = model.get_latent_representation(representation="full")
    z2 = model.get_latent_representation(representation="full")
    np.testing.assert_array_equal(z1, z2)
    zs = model.get_latent_representation(representation="full", give_mean=False)
    assert not np.allclose(zs, z1)
    dist = model.get_latent_representation(representation="lr", return_dist=True, indices=np.arange(10))
    np.testing.assert_array_equal(dist["mean"], z1[:10, 6:])
    assert dist["var"].shape == (10, 12) and np.all(dist["var"] > 0)
    assert dist["dist"].loc.shape == (10, 12)
    # predictions use posterior means: identical twice
    p1 = model.predict(soft=True)
    np.testing.assert_array_equal(p1, model.predict(soft=True))
    np.testing.assert_allclose(p1.sum(1), 1.0, rtol=1e-5)


def test_predict_formats(trained):
    model, adata = trained
    idx = np.arange(5, 25)
    soft = model.predict(indices=idx, soft=True, return_numpy=False)
    assert isinstance(soft, pd.DataFrame)
    assert list(soft.index) == list(adata.obs_names[idx])
    assert list(soft.columns) == [f"type_{k}" for k in range(4)]
    hard = model.predict(indices=idx, return_numpy=False)
    assert isinstance(hard, pd.Series) and (hard.index == adata.obs_names[idx]).all()
    batch = model.predict(prediction_mode="batch")
    assert np.mean(batch == adata.obs["batch"].to_numpy()) > 0.95


def test_transform_batch_is_a_counterfactual(trained):
    model, adata = trained
    cells = np.flatnonzero(adata.obs["batch"].to_numpy() == "batch_0")[:150]
    as0 = model.get_normalized_expression(indices=cells, transform_batch="batch_0", n_samples=5)
    as1 = model.get_normalized_expression(indices=cells, transform_batch="batch_1", n_samples=5)
    assert list(as1.index) == list(adata.obs_names[cells]) and list(as1.columns) == list(adata.var_names)
    lfc = np.log(as1.to_numpy() + 1e-6).mean(0) - np.log(as0.to_numpy() + 1e-6).mean(0)
    truth = adata.varm["batch_effect"][:, 1] - adata.varm["batch_effect"][:, 0]
    # softmax normalisation shifts all genes together: compare centred log-fold changes
    r = np.corrcoef(lfc - lfc.mean(), truth - truth.mean())[0, 1]
    assert r > 0.8, r


def test_differential_expression_and_marginal_ll(trained):
    model, adata = trained
    de = model.differential_expression(
        groupby="cell_type", group1="type_0", group2="type_1", batch_correction=True, n_samples_overall=300
    )
    assert {"proba_m1", "bayes_factor", "scale1", "scale2"} <= set(de.columns)
    top = (np.log(de["scale1"]) - np.log(de["scale2"])).sort_values(ascending=False).index[:10]
    assert (adata.var.loc[top, "marker_of"] == "type_0").mean() >= 0.8
    ll = model.get_marginal_ll(indices=np.arange(40), n_mc_samples=4)
    assert np.isfinite(ll) and ll < 0
    samples = model.posterior_predictive_sample(indices=np.arange(7), n_samples=2)
    assert samples.shape == (7, adata.n_vars, 2)


def test_save_load_equal(trained, tmp_path):
    model, adata = trained
    model.save(tmp_path / "m", overwrite=True)
    loaded = FADVI.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(
        model.get_latent_representation(representation="full"),
        loaded.get_latent_representation(representation="full"),
    )
    np.testing.assert_array_equal(model.predict(soft=True), loaded.predict(soft=True))


def test_attributions(trained):
    pytest.importorskip("captum")
    model, adata = trained
    idx = np.arange(12)
    res = model.predict(indices=idx, interpretability="ig", interpretability_args={"n_steps": 16})
    a = res["attributions"]
    assert a.shape == (12, adata.n_vars) and a.dtype == np.float32
    again = model.predict(indices=idx, interpretability="ig", interpretability_args={"n_steps": 16})
    np.testing.assert_allclose(again["attributions"], a, rtol=1e-5, atol=1e-7)
    # marker genes of a cell's predicted type carry more attribution than the other genes
    own = adata.var["marker_of"].to_numpy()[None, :] == np.asarray(res["predictions"])[:, None]
    assert np.abs(a)[own].mean() > 2 * np.abs(a)[~own].mean()
    gs1 = model.predict(indices=idx, interpretability="gs", return_dict=False)
    gs2 = model.predict(indices=idx, interpretability="gs", return_dict=False)
    np.testing.assert_array_equal(gs1[1], gs2[1])
    ranked = model.get_ranked_features(adata, res["attributions"], top_n=5)
    assert list(ranked.columns[:6]) == [
        "feature",
        "feature_idx",
        "attribution_mean",
        "attribution_std",
        "attribution_abs_mean",
        "n_cells",
    ]
    assert len(ranked) == 5 and ranked["attribution_abs_mean"].is_monotonic_decreasing
    per_class = model.get_ranked_features(adata, res, top_n=3)
    assert set(per_class["group"]) == {"all", *set(res["predictions"])}
    with pytest.raises(ValueError, match="columns"):
        model.get_ranked_features(adata, a[:, :10])


def test_query_mapping(trained):
    model, adata = trained
    query = simulate_batches(
        n_cells=300, n_genes=200, n_batches=4, n_labels=4, seed=1, composition_concentration=None
    )
    query = query[query.obs["batch"] == "batch_3"].copy()
    query.obs["batch"] = "query_batch"
    query.obs["labels"] = "Unknown"
    q = FADVI.load_query_data(query, model)
    before = q.module.prior_mean_b.detach().clone()
    q.train(max_epochs=5, **QUIET)
    after = q.module.prior_mean_b.detach()
    torch.testing.assert_close(after[:, :3], before[:, :3])  # reference batches untouched
    assert not torch.allclose(after[:, 3], before[:, 3])  # the query batch is learned
    pred = q.predict()
    assert np.mean(pred == query.obs["cell_type"].to_numpy()) > 0.7
    bad = query[:, :150].copy()
    bad.var_names = [f"new_{i}" for i in range(150)]
    with pytest.raises(ValueError, match="not seen"):
        FADVI.load_query_data(bad, model)


def test_confounded_batches_default_sizes_leak_little():
    """Batches differing in type composition, default latent sizes (30/30/10): no block leaks.

    A leak here lives in the small within-batch (within-label) variation of z_b (z_l), which a
    nearest-neighbour probe reads inside each tight batch (label) cluster. Batch composition makes
    the label partly predictable from the batch alone (and vice versa), so the bounds sit above
    chance; before the adversaries worked within groups, z_l gave the batch at 1.0, z_b the label
    at 0.89 and the residual at R^2 0.86.
    """
    import scvi

    scvi.settings.seed = 0
    adata = simulate_batches(n_cells=1500, n_genes=200, n_batches=3, n_labels=6, seed=0)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata)
    model.train(max_epochs=25, batch_size=128, **QUIET)
    p = evaluate_disentanglement(model, labels_key="cell_type", continuous_keys=["residual"]).set_index(
        ["latent", "target"]
    )["score"]
    assert p[("z_l", "label")] > 0.95 and p[("z_r", "residual")] > 0.85, p
    assert p[("z_l", "batch")] < 0.8, p
    assert p[("z_b", "label")] < 0.7, p
    assert p[("z_b", "residual")] < 0.3, p
    assert p[("z_l", "residual")] < 0.3, p


def test_group_whitening_measures_leaks_along_small_directions():
    """The adversaries' view of a block: centred within groups, whitened by the pooled covariance.

    One large within-group direction (90%+ of the variance, as in a trained ``z_b``) sets every
    column's scale; a label carried by a small direction is then nearly invisible to a
    column-scaled class-mean spread, while a linear probe reads it. Whitened, it is measured at
    its own scale.
    """
    from cellvi.fadvi._module import _class_mean_spread, _group_whiten

    g = torch.Generator().manual_seed(0)
    n, d = 600, 5
    group = torch.arange(n) % 3
    label = (torch.arange(n) // 3) % 2
    big = 10.0 * torch.randn(n, 1, generator=g) * torch.ones(1, d)
    small = (0.1 * torch.randn(n, 1, generator=g) + 0.2 * label[:, None]) * torch.tensor(
        [[1.0, -1.0, 0, 0, 0]]
    )
    noise = 0.05 * torch.randn(n, d, generator=g)
    z = big + small + noise + 5.0 * group[:, None].float()
    onehot = torch.nn.functional.one_hot(group, 3).float()
    # zero group means, identity pooled within-group covariance (up to the ridge)
    exact = _group_whiten(z.double(), onehot.double(), ridge=1e-9)
    torch.testing.assert_close(
        onehot.double().T @ exact / 200, torch.zeros(3, d, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        exact.T @ exact / (n - 3), torch.eye(d, dtype=torch.float64), atol=1e-3, rtol=0
    )
    # the ridge (relative to the mean variance, here ~100) damps directions far smaller than it
    w = _group_whiten(z, onehot, ridge=1e-5)
    # column scaling (the adversaries' view before): the label is almost invisible
    zc = z - onehot @ (onehot.T @ z / onehot.sum(0)[:, None])
    cols = zc / zc.std(0, keepdim=True)
    oh_label = torch.nn.functional.one_hot(label, 2).float()
    seen_cols = float(_class_mean_spread(cols, oh_label))
    seen_white = float(_class_mean_spread(w, oh_label))
    assert seen_white > 0.3 and seen_white > 10 * seen_cols, (seen_white, seen_cols)
    # gradients flow (the encoders are trained through it); one cell: no signal, no error
    z.requires_grad_(True)
    _class_mean_spread(_group_whiten(z, onehot), oh_label).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert float(_group_whiten(z[:1], onehot[:1]).abs().sum()) == 0.0


def test_kernel_leak_reads_clusters_that_class_means_miss():
    """Within-group kernel alignment: what a nearest-neighbour probe reads inside a tight group.

    Two classes in XOR clusters have equal class means (no linear signal for the class-mean
    spread), yet each cell's neighbours share its class. The alignment sees it at any scale, and
    sits near its no-signal level when the classes are shuffled over the same points.
    """
    from torch.nn.functional import one_hot

    from cellvi.fadvi._module import _class_mean_spread, _kernel_leak

    g = torch.Generator().manual_seed(0)
    n = 240
    group = torch.arange(n) % 3
    label = (torch.arange(n) // 3) % 2
    corner = (torch.arange(n) // 6) % 2  # which of the class's two clusters
    sign = torch.stack([1 - 2 * corner, (1 - 2 * corner) * (1 - 2 * label)], 1).float()
    z = 0.01 * sign + 0.001 * torch.randn(n, 2, generator=g) + 5.0 * group[:, None].float()
    z = torch.cat([z, 5.0 * group[:, None].float()], 1)  # a column holding only the group
    oh_g, oh_y = one_hot(group, 3), one_hot(label, 2)
    leak = float(_kernel_leak(z, oh_g, oh_y))
    shuffled = float(_kernel_leak(z, oh_g, oh_y[torch.randperm(n, generator=g)]))
    assert leak > 0.3 and leak > shuffled + 0.25, (leak, shuffled)
    assert float(_kernel_leak(1e-3 * z, oh_g, oh_y)) == pytest.approx(leak, rel=1e-3)
    # the linear view of the same block sees nothing: the class means coincide within groups
    zc = z - one_hot(group, 3).float() @ (one_hot(group, 3).float().T @ z / 80)
    zc = zc[:, :2] / zc[:, :2].std(0)
    assert float(_class_mean_spread(zc, oh_y.float())) < 0.02
    # masked cells take no part; a group with one class only, or fewer than four cells, is skipped
    keep = torch.arange(n) < 120
    assert float(_kernel_leak(z, oh_g, oh_y, keep)) == pytest.approx(
        float(_kernel_leak(z[keep], oh_g[keep], oh_y[keep])), rel=1e-3
    )
    assert float(_kernel_leak(z, oh_g, one_hot(torch.zeros(n, dtype=torch.long), 2))) == 0.0
    assert float(_kernel_leak(z[:3], oh_g[:3], oh_y[:3])) == 0.0
    # stacked measures (padded to a common width) equal the separate ones
    from cellvi.fadvi._module import _pad_columns

    z2 = torch.randn(n, 5, generator=g) + 0.3 * one_hot(group, 3).float() @ torch.randn(3, 5, generator=g)
    both = _kernel_leak(_pad_columns(z, z2), _pad_columns(oh_g, oh_y), _pad_columns(oh_y, oh_g))
    torch.testing.assert_close(both, torch.stack([_kernel_leak(z, oh_g, oh_y), _kernel_leak(z2, oh_y, oh_g)]))
    # the encoders are trained through it, also when a group is skipped (no NaN gradient): one
    # with a single class, and one absent from the minibatch (a fourth group column)
    z.requires_grad_(True)
    one_class_group = (
        oh_y * (group != 0)[:, None] + one_hot(torch.zeros(n, dtype=torch.long), 2) * (group == 0)[:, None]
    )
    _kernel_leak(z, one_hot(group, 4), one_class_group).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_alpha_kernel_validated():
    adata = simulate_batches(n_cells=60, n_genes=30, n_batches=2, n_labels=2, seed=0)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    for bad in (-1.0, True, "1"):
        with pytest.raises(ValueError, match="alpha_kernel"):
            FADVI(adata, alpha_kernel=bad)
    assert FADVI(adata, alpha_kernel=0).module.alpha_kernel == 0.0


def test_whiten_ridge_validated():
    adata = simulate_batches(n_cells=60, n_genes=30, n_batches=2, n_labels=2, seed=0)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    for bad in (0, -1.0, True, "0.01"):
        with pytest.raises(ValueError, match="whiten_ridge"):
            FADVI(adata, whiten_ridge=bad)
    assert FADVI(adata, whiten_ridge=0.1).module.whiten_ridge == 0.1


def test_head_direct_ops_equal_module_calls():
    """_Head calls its layers' ops directly; same values and gradients as the modules (and functional_call)."""
    from cellvi.fadvi._module import _Head

    torch.manual_seed(0)
    z = torch.randn(64, 9, requires_grad=True)
    for dropout in (0.0, 0.2):
        head = _Head(9, 4, 16, dropout)
        for training in (False, True):
            head.train(training)
            torch.manual_seed(1)
            fast = head(z)
            torch.manual_seed(1)
            slow = head.out(head.net(z))
            torch.testing.assert_close(fast, slow, rtol=0, atol=0)
            # gradients of the parameters and of the input
            upstream = torch.randn_like(fast)
            torch.manual_seed(1)
            g_fast = torch.autograd.grad(head(z), (z, *head.parameters()), upstream)
            torch.manual_seed(1)
            g_slow = torch.autograd.grad(head.out(head.net(z)), (z, *head.parameters()), upstream)
            for a, b in zip(g_fast, g_slow, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # frozen: the adversaries' call, gradients reach z only
    head = _Head(9, 4, 16, 0.0)
    params = {name: p.detach() for name, p in head.named_parameters()}
    ref = torch.func.functional_call(head, params, (z,))
    out = head.frozen(z)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    upstream = torch.randn_like(out)
    (g_z,) = torch.autograd.grad(out, z, upstream)
    (g_ref,) = torch.autograd.grad(ref, z, upstream)
    torch.testing.assert_close(g_z, g_ref, rtol=0, atol=0)
    head.zero_grad()
    head.frozen(z).sum().backward()
    assert all(p.grad is None for p in head.parameters())
    # the adversaries have no dropout layer; state-dict names unchanged
    assert head.net.fc_layers[0][4] is None
    assert set(head.state_dict()) == {
        "net.fc_layers.Layer 0.0.weight",
        "net.fc_layers.Layer 0.0.bias",
        "out.weight",
        "out.bias",
    }


# --------------------------------------------------------------- options
@pytest.fixture(scope="module")
def small():
    return simulate_batches(n_cells=260, n_genes=60, n_batches=2, n_labels=3, covariates=True, seed=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dispersion": "gene-label", "gene_likelihood": "nb"},
        {"dispersion": "gene-batch", "gene_likelihood": "poisson"},
        {"dispersion": "gene-cell", "use_observed_lib_size": False},
    ],
)
def test_options_train_and_decode(small, kwargs):
    adata = small.copy()
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata, **SMALL, **kwargs)
    model.train(max_epochs=2, **QUIET)
    expr = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"])
    assert expr.shape == (adata.n_obs, adata.n_vars) and np.isfinite(expr.to_numpy()).all()
    assert np.isfinite(model.get_elbo())


def test_covariates_and_size_factor(small):
    adata = small.copy()
    adata.obs["sf"] = adata.obs["library_size"] / adata.obs["library_size"].mean()
    FADVI.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="labels",
        size_factor_key="sf",
        categorical_covariate_keys=["protocol"],
        continuous_covariate_keys=["pct_mito"],
    )
    model = FADVI(adata, **SMALL)
    assert model.module.use_size_factor_key and model.module.n_continuous_cov == 1
    model.train(max_epochs=3, **QUIET)
    x = model.get_normalized_expression(library_size="latent", n_samples=1)
    assert np.isfinite(x.to_numpy()).all()
    # the continuous covariate reaches the decoder: changing it changes the decoded expression
    shifted = adata.copy()
    shifted.obs["pct_mito"] = shifted.obs["pct_mito"] + 10.0
    model.module.eval()
    a = model.get_normalized_expression(adata, n_samples=1, indices=np.arange(20))
    b = model.get_normalized_expression(shifted, n_samples=1, indices=np.arange(20))
    assert not np.allclose(a.to_numpy(), b.to_numpy())


def test_single_batch_and_last_minibatch_of_one(small):
    adata = small[:257].copy()
    FADVI.setup_anndata(adata, labels_key="labels")
    with pytest.warns(UserWarning, match="single batch"):
        model = FADVI(adata, **SMALL)
    model.train(max_epochs=2, batch_size=128, train_size=1.0, **QUIET)  # 257 = 2 * 128 + 1
    assert model.get_latent_representation().shape == (257, 8)


def test_unlabeled_category_absent_is_all_labeled(small):
    adata = small.copy()
    adata.obs["labels"] = adata.obs["cell_type"]
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata, **SMALL)
    assert model.module.n_labels == 3
    model.train(max_epochs=1, **QUIET)
    assert model.predict(soft=True).shape == (adata.n_obs, 3)


def test_bad_input(small):
    adata = small.copy()
    with pytest.raises(ValueError, match="labels_key is required"):
        FADVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match="labels_key='nope'"):
        FADVI.setup_anndata(adata, batch_key="batch", labels_key="nope")
    with pytest.raises(ValueError, match="unlabeled_category='unknown'"):
        FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels", unlabeled_category="unknown")
    nan = adata.copy()
    nan.obs.loc[nan.obs_names[3], "pct_mito"] = np.nan
    with pytest.raises(ValueError, match="pct_mito"):
        FADVI.setup_anndata(
            nan, batch_key="batch", labels_key="labels", continuous_covariate_keys=["pct_mito"]
        )
    nan_cat = adata.copy()
    nan_cat.obs["protocol"] = nan_cat.obs["protocol"].astype(object)
    nan_cat.obs.loc[nan_cat.obs_names[0], "protocol"] = None
    with pytest.raises(ValueError, match="protocol"):
        FADVI.setup_anndata(
            nan_cat, batch_key="batch", labels_key="labels", categorical_covariate_keys=["protocol"]
        )
    frac = adata.copy()
    frac.X = frac.X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        FADVI.setup_anndata(frac, batch_key="batch", labels_key="labels")
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    with pytest.raises(ValueError, match="dispersion"):
        FADVI(adata, dispersion="gene-sample")
    with pytest.raises(ValueError, match="setup_anndata"):
        FADVI(adata, batch_key="batch")
    model = FADVI(adata, **SMALL)
    with pytest.raises(ValueError, match="representation"):
        model.get_latent_representation(representation="x")
    with pytest.raises(ValueError, match="prediction_mode"):
        model.predict(prediction_mode="cells")
    with pytest.raises(ValueError, match="interpretability"):
        model.predict(interpretability="shap")


def test_registry_entries():
    assert cellvi.FADVI is FADVI
    assert cellvi.data.simulate_batches is simulate_batches
    a = simulate_batches(n_cells=50, n_genes=30, seed=5)
    b = simulate_batches(n_cells=50, n_genes=30, seed=5)
    assert (a.X != b.X).nnz == 0
    assert set(a.obs["labels"].cat.categories) == {
        "type_0",
        "type_1",
        "type_2",
        "type_3",
        "type_4",
        "Unknown",
    }


# --------------------------------------------------------------- data path
def _trained_state(adata, data_path, **kwargs):
    import scvi

    scvi.settings.seed = 0
    model = FADVI(adata, n_latent_b=4, n_latent_l=4, n_latent_r=2, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, data_path=data_path, **QUIET, **kwargs)
    return model, {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_data_path_device_equals_scvi_loader():
    """The shared data path (default) trains the same parameters as scvi's semi-supervised loader.

    Every cell is labelled here: with unlabelled cells the labelled loader is the shorter one and
    restarts within an epoch, reshuffled on cellvi's path where scvi replays its first pass.
    """
    adata = simulate_batches(n_cells=300, n_genes=50, n_batches=2, n_labels=3, unlabeled_fraction=0.0, seed=2)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model, fast = _trained_state(adata, "auto", check_val_every_n_epoch=1)
    assert model.trainer.datamodule.resolved_data_path == "device"
    _, ref = _trained_state(adata, "scvi", check_val_every_n_epoch=1)
    for key in fast:
        torch.testing.assert_close(fast[key], ref[key], rtol=0, atol=0, msg=key)
    assert "elbo_validation" in model.history
    with pytest.raises(ValueError, match="data_path"):
        model.train(max_epochs=1, data_path="gpu", **QUIET)
    with pytest.raises(ValueError, match="n_samples_per_label"):
        model.train(max_epochs=1, n_samples_per_label=0, **QUIET)


def test_labelled_minibatch_reaches_the_label_head():
    adata = simulate_batches(n_cells=200, n_genes=40, n_batches=2, n_labels=3, unlabeled_fraction=0.8, seed=4)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = FADVI(adata, n_latent_b=4, n_latent_l=4, n_latent_r=2, n_hidden=32)
    from cellvi.dataloaders import SemiSupervisedDataSplitter

    splitter = SemiSupervisedDataSplitter(model.adata_manager, batch_size=64, n_samples_per_label=5)
    splitter.setup()
    full, labelled = next(iter(splitter.train_dataloader()))
    assert labelled["X"].shape[0] == 15  # 5 per class
    torch.manual_seed(0)
    _, _, alone = model.module(full)
    torch.manual_seed(0)
    _, _, both = model.module((full, labelled))
    # the same forward pass; only the label head's cross-entropy sees the extra labelled cells
    torch.testing.assert_close(alone.extra_metrics["elbo_loss"], both.extra_metrics["elbo_loss"])
    assert not torch.isclose(alone.extra_metrics["sup_loss_l"], both.extra_metrics["sup_loss_l"])
    # trains with label subsampling (scvi's per-epoch SubSampleLabels callback)
    model.train(max_epochs=2, n_samples_per_label=10, **QUIET)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
