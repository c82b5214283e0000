"""cellvi.interpretation on a trained AMICI: recovery of the planted interactions, schemas, calibration, plots."""

from __future__ import annotations

import math

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from cellvi.amici import AMICI
from cellvi.data import simulate_spatial
from cellvi.interpretation import (
    AMICIAblationModule,
    AMICIAttentionModule,
    AMICICounterfactualAttentionModule,
    AMICIExplainedVarianceModule,
)

SMALL = dict(
    n_heads=4, n_head_size=16, n_query_dim=32, n_query_embed_hidden=64,
    n_nn_embed=64, n_nn_embed_hidden=128, n_kv_dim=64, n_pos_coef_mlp_hidden=32,
)  # fmt: skip
K = 15


def _setup(adata):
    AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=K)
    return adata


@pytest.fixture(scope="module")
def model():
    """AMICI trained on the planted tissue: B -> A (up, 20 units), C -> B (down, 12 units), decoy D."""
    scvi.settings.seed = 0
    adata = _setup(simulate_spatial(n_cells=2000, n_genes=80, seed=3))
    m = AMICI(adata, **SMALL)
    m.train(max_epochs=30, enable_progress_bar=False)
    return m


@pytest.fixture(scope="module")
def ablation(model):
    return AMICIAblationModule.compute(model, compute_z_value=True, prog_bar=False)


@pytest.fixture(scope="module")
def expl_var(model):
    return AMICIExplainedVarianceModule.compute(model, prog_bar=False)


@pytest.fixture(scope="module")
def null_model():
    """AMICI trained on a tissue with no planted effect."""
    scvi.settings.seed = 0
    adata = _setup(simulate_spatial(n_cells=1500, n_genes=60, interactions=None, seed=5))
    m = AMICI(adata, **SMALL)
    m.train(max_epochs=20, enable_progress_bar=False)
    return m


def _targets(model, pair):
    var = model.adata.var
    return list(var.index[var["target_of"] == pair])


# ---------------------------------------------------------------------------- ablation
def test_interaction_weights_rank_planted_pairs_above_others_and_decoy(ablation):
    W = ablation.get_interaction_weight_matrix(weight="ablation")
    assert W.index.tolist() == ["A", "B", "C", "D"] and W.columns.tolist() == ["A", "B", "C", "D"]
    true = [W.at["B", "A"], W.at["C", "B"]]
    others = [W.at[s, r] for s in W.index for r in W.columns if (s, r) not in {("B", "A"), ("C", "B")}]
    assert min(true) > 5 * max(others)
    counts = ablation.get_interaction_weight_matrix()
    assert counts.dtypes.eq(np.int64).all()
    assert counts.at["B", "A"] == counts.to_numpy().max()
    assert counts.loc["D"].sum() < min(counts.at["B", "A"], counts.at["C", "B"])  # the decoy sends nothing
    assert counts.at["C", "B"] >= 6  # most of the 8 down-regulated targets
    # the original's rule (up-regulation only) misses the down-regulating pair
    assert ablation.get_interaction_weight_matrix(direction="up").at["C", "B"] < counts.at["C", "B"]


def test_planted_genes_have_significant_z_values_of_the_right_sign(model, ablation):
    df = ablation.ablation_scores
    a = df[df["cell_type"] == "A"].set_index("gene")
    b = df[df["cell_type"] == "B"].set_index("gene")
    up, down = _targets(model, "B->A"), _targets(model, "C->B")
    thr = -math.log10(0.05)
    assert (a.loc[up, "B_z_value"] > 0).all() and (a.loc[up, "B_nl10_pval_adj"] > thr).all()
    assert (a.loc[up, "B_diff"] > 0).all()
    assert (b.loc[down, "C_z_value"] < 0).mean() == 1.0 and (b.loc[down, "C_nl10_pval_adj"] > thr).mean() >= 0.75
    assert (b.loc[down, "C_diff"] < 0).all()
    # the planted genes are the top genes by |z| for their pair
    assert set(a["B_z_value"].nlargest(len(up)).index) == set(up)
    assert len(set(b["C_z_value"].nsmallest(len(down)).index) & set(down)) >= 6
    # ablating a receiver's own type does nothing (never a neighbour)
    np.testing.assert_array_equal(a["A_diff"].to_numpy(), 0.0)


def test_ablation_schema_and_batched_passes_match_single_sender_runs(model, ablation):
    df = ablation.ablation_scores
    genes = model.adata.var_names
    assert len(df) == 4 * len(genes)
    expected = [f"{s}_{k}" for s in "ABCD" for k in ("ablation", "diff", "z_value", "nl10_pval", "nl10_pval_adj")]
    assert list(df.columns) == [*expected, "gene_variance", "gene", "head_idx", "cell_type"]
    assert all(df[c].dtype == np.float64 for c in [*expected, "gene_variance"])
    assert str(df["head_idx"].dtype) == "Int64" and df["head_idx"].isna().all()
    # one sender at a time, restricted receivers: same numbers as the batched pass
    one = AMICIAblationModule.compute(model, cell_type="B", ablated_neighbor_ct_sub=["C"], compute_z_value=True,
                                      prog_bar=False, batch_size=77)
    ref = df[df["cell_type"] == "B"].reset_index(drop=True)
    got = one.ablation_scores
    assert [c for c in got.columns if c.startswith("C_")] == [f"C_{k}" for k in ("ablation", "diff", "z_value", "nl10_pval", "nl10_pval_adj")]
    for k in ("ablation", "diff", "z_value"):
        np.testing.assert_allclose(got[f"C_{k}"], ref[f"C_{k}"], rtol=1e-4, atol=1e-6)
    # ablating every C cell by index is the same as ablating the C type
    c_cells = np.flatnonzero(model.adata.obs["cell_type"] == "C")
    idx = AMICIAblationModule.compute(model, cell_type="B", ablated_neighbor_indices=c_cells, prog_bar=False)
    np.testing.assert_allclose(idx.ablation_scores["ablated_indices_diff"], ref["C_diff"], rtol=1e-5, atol=1e-7)
    names = AMICIAblationModule.compute(model, cell_type="B", ablated_neighbor_indices=model.adata.obs_names[c_cells],
                                        prog_bar=False)
    np.testing.assert_allclose(names.ablation_scores["ablated_indices_diff"], ref["C_diff"], rtol=1e-5, atol=1e-8)


def test_sparse_expression_gives_the_same_scores(model):
    from scipy import sparse

    dense = model.adata
    sp = dense.copy()
    sp.X = sparse.csr_matrix(sp.X)
    a = AMICIAblationModule.compute(model, cell_type="B", compute_z_value=True, prog_bar=False).ablation_scores
    b = AMICIAblationModule.compute(model, adata=sp, cell_type="B", compute_z_value=True, prog_bar=False).ablation_scores
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
    att = AMICIAttentionModule.compute(model, adata=sp, indices=np.arange(50), flavor="info-weighted", prog_bar=False)
    ref = AMICIAttentionModule.compute(model, indices=np.arange(50), flavor="info-weighted", prog_bar=False)
    np.testing.assert_allclose(att._attention, ref._attention, rtol=1e-4, atol=1e-7)


def test_ablation_by_head_sums_to_all_heads_and_diff_is_exact(model):
    full = AMICIAblationModule.compute(model, cell_type="A", ablated_neighbor_ct_sub=["B"], prog_bar=False)
    per_head = [
        AMICIAblationModule.compute(model, cell_type="A", head_idx=h, ablated_neighbor_ct_sub=["B"], prog_bar=False)
        for h in range(SMALL["n_heads"])
    ]
    assert (per_head[1].ablation_scores["head_idx"] == 1).all()
    total = sum(p.ablation_scores["B_diff"].to_numpy() for p in per_head)
    np.testing.assert_allclose(total, full.ablation_scores["B_diff"], rtol=1e-4, atol=1e-6)
    # diff = mean over A cells of the attention-weighted value writes of the B neighbours
    adata = model.adata
    rows = np.flatnonzero(adata.obs["cell_type"] == "A")
    module = model.module.eval()
    code_b = list(adata.obs["cell_type"].cat.categories).index("B")
    nn_idx = adata.obsm["_nn_idx"][rows]
    with torch.inference_mode():
        store = model._store(adata)
        gen = module(store.batch(torch.as_tensor(rows)), compute_loss=False)[1]
        a = gen["attention"][..., :-1]  # (n, H, K)
        contrib = module.value_contributions(torch.as_tensor(adata.X))  # (N, H, G)
        is_b = torch.as_tensor(np.asarray(adata.obs["cell_type"].cat.codes)[nn_idx] == code_b)
        ref = torch.einsum("nhk,nkhg->ng", a * is_b[:, None, :], contrib[torch.as_tensor(nn_idx)]).mean(0)
    np.testing.assert_allclose(full.ablation_scores["B_diff"], ref.numpy(), rtol=1e-4, atol=1e-6)


def test_ablation_one_pass_shortcut_equals_the_attention_scale_hook(model):
    from cellvi.interpretation._ablation import _ablated_predictions, _head_readout
    from cellvi.interpretation._access import ModelData, eval_mode

    data = ModelData(model)
    assert _head_readout(data) is not None
    with eval_mode(data.module):
        batch = data.store.batch(torch.arange(100))
        ablated = data.store.labels[batch["nn_idx"]][None] == torch.arange(4)[:, None, None]  # (4, B, K)
        for heads in (None, [2]):
            full, delta = _ablated_predictions(data, batch, ablated, heads, _head_readout(data))
            full_h, delta_h = _ablated_predictions(data, batch, ablated, heads, None)  # replicated, attention_scale
            assert full.shape == (100, model.adata.n_vars) and delta.shape == (4, 100, model.adata.n_vars)
            np.testing.assert_allclose(full.numpy(), full_h.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(delta.numpy(), delta_h.numpy(), rtol=1e-3, atol=1e-5)
            assert delta.abs().max() > 1e-3


def test_all_ablations_of_a_receiver_type_share_one_pass_per_minibatch(model, monkeypatch):
    """Four sender groups, one receiver type: one forward pass per minibatch of receivers, not one per sender."""
    calls = []
    inner = model.module.generative
    monkeypatch.setattr(model.module, "generative", lambda *a, **k: calls.append(1) or inner(*a, **k))
    n_a = int((model.adata.obs["cell_type"] == "A").sum())
    out = AMICIAblationModule.compute(model, cell_type="A", batch_size=100, prog_bar=False)
    assert out.sender_groups == ["A", "B", "C", "D"]
    assert len(calls) == math.ceil(n_a / 100)


def test_ablation_errors_and_plots(model, ablation, tmp_path):
    with pytest.raises(ValueError, match="cell_type"):
        AMICIAblationModule.compute(model, cell_type="Z", prog_bar=False)
    with pytest.raises(ValueError, match="head_idx"):
        AMICIAblationModule.compute(model, cell_type="A", head_idx=9, prog_bar=False)
    with pytest.raises(ValueError, match="not both"):
        AMICIAblationModule.compute(model, ablated_neighbor_ct_sub=["B"], ablated_neighbor_indices=[0], prog_bar=False)
    with pytest.raises(ValueError, match="ablated_neighbor_ct_sub"):
        AMICIAblationModule.compute(model, ablated_neighbor_ct_sub=["Q"], prog_bar=False)
    with pytest.raises(ValueError, match="ablated_neighbor_indices"):
        AMICIAblationModule.compute(model, ablated_neighbor_indices=[10**7], prog_bar=False)
    no_z = AMICIAblationModule.compute(model, cell_type="A", prog_bar=False)
    with pytest.raises(ValueError, match="compute_z_value=True"):
        no_z.get_interaction_weight_matrix()
    with pytest.raises(ValueError, match="score column"):
        no_z.plot_featurewise_contributions_dotplot(show=False)
    with pytest.raises(ValueError, match="cell_type is required"):
        ablation.plot_neighbor_ablation_scores(show=False)
    figs = [
        ablation.plot_neighbor_ablation_scores("A", show=False, save_png=True, save_dir=tmp_path),
        ablation.plot_featurewise_ablation_heatmap("A", show=False),
        ablation.plot_featurewise_contributions_heatmap("B", show=False),
        ablation.plot_featurewise_contributions_dotplot("B", show=False, save_svg=True, save_dir=tmp_path),
        ablation.plot_interaction_weight_heatmap(show=False),
        ablation.get_interaction_circos_plot(show=False, weight="ablation"),
        ablation.plot_interaction_directed_graph(show=False, weight="ablation", weight_threshold=0.5),
    ]
    assert all(hasattr(f, "savefig") for f in figs)
    assert set(figs[-1].graph.edges) == {("B", "A"), ("C", "B")}
    assert (tmp_path / "neighbor_ablation_A_ablation.png").stat().st_size > 1000
    assert (tmp_path / "featurewise_contributions_dotplot_B.svg").exists()
    ablation.save(tmp_path / "abl.csv")
    back = pd.read_csv(tmp_path / "abl.csv")
    np.testing.assert_allclose(back["B_diff"], ablation.ablation_scores["B_diff"])


# ---------------------------------------------------------------------------- counterfactual
def test_length_scales_recover_the_planted_radii(model, expl_var):
    for receiver, sender, radius in (("A", "B", 20.0), ("B", "C", 12.0)):
        head = expl_var.compute_max_explained_variance_head(receiver)
        cf = AMICICounterfactualAttentionModule.compute(model, receiver, prog_bar=False)
        ci = cf.length_scale_confidence_intervals(head_idxs=[head], sender_types=[sender], n_bootstrap=500)
        est = float(ci["estimate"].iloc[0])
        assert abs(est - radius) < 0.25 * radius, (receiver, sender, est)
        assert ci["ci_low"].iloc[0] <= est <= ci["ci_high"].iloc[0]
        # the decoy's length scale in that head is far shorter
        ls = cf.calculate_length_scales(head_idxs=[head])
        assert ls.loc[ls["neighbor_label"] == "D", "length_scale"].median() < 0.5 * est


def test_counterfactual_schema_head_idxs_and_the_models_dummy_score(model):
    cf = AMICICounterfactualAttentionModule.compute(model, "A", head_idxs=[1, 3], prog_bar=False, batch_size=50)
    df = cf.counterfactual_attention
    assert list(df.columns) == ["query_label", "neighbor_idx", "neighbor_label", "head_idx", "base_attention_score",
                                "pos_coef", "dummy_attention_score", "distance_kernel_unit_scale"]
    assert sorted(df["head_idx"].unique()) == [1, 3] and df["head_idx"].dtype == np.int64
    assert (df["query_label"] == "A").all() and (df["neighbor_label"] != "A").all()
    assert df["pos_coef"].gt(0).all() and df["base_attention_score"].dtype == np.float32
    # senders: exactly the cells in some A receiver's neighbour list
    rows = model.adata.obs["cell_type"] == "A"
    senders = np.unique(model.adata.obsm["_nn_idx"][rows.to_numpy()])
    assert set(df["neighbor_idx"]) == set(senders) and df["neighbor_idx"].dtype == np.int64  # positions, as amici-st
    with pytest.raises(ValueError, match="head_idxs"):
        cf.calculate_length_scales(head_idxs=[0])
    curves = cf.calculate_counterfactual_attention_at_distances(3, [0.0, 5.0, 50.0])
    assert list(curves.columns) == ["query_label", "neighbor_idx", "neighbor_label", "head_3", "distance"]
    att = curves["head_3"].to_numpy().reshape(-1, 3)
    assert np.all(np.diff(att, axis=1) < 0)  # attention decays with distance
    h3 = df[df["head_idx"] == 3]
    np.testing.assert_allclose(att[:, 0], 1 / (1 + np.exp(-(h3["base_attention_score"] - model.module.dummy_score))),
                               rtol=1e-5)
    # the length scale uses the model's own dummy score (not a hard-coded 3)
    ls = cf.calculate_length_scales(head_idxs=[3], sample_threshold=0)
    old = model.module._dummy_score
    try:
        model.module._dummy_score = old + 1.0
        cf2 = AMICICounterfactualAttentionModule.compute(model, "A", head_idxs=[3], prog_bar=False)
    finally:
        model.module._dummy_score = old
    ls2 = cf2.calculate_length_scales(sample_threshold=0)
    assert (cf2.counterfactual_attention["dummy_attention_score"] == old + 1.0).all()
    beta = h3["pos_coef"].to_numpy(np.float64)
    expect = np.clip(ls["length_scale"].to_numpy() - 1.0 / beta, 0, None)
    pos = ls["length_scale"].to_numpy() > 1.0 / beta
    np.testing.assert_allclose(ls2["length_scale"].to_numpy()[pos], expect[pos], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cell_type"):
        AMICICounterfactualAttentionModule.compute(model, "Z", prog_bar=False)
    with pytest.raises(ValueError, match="attention_threshold"):
        cf.calculate_length_scales(attention_threshold=1.0)


def test_length_scale_artefact_filter_and_plots(model, tmp_path):
    cf = AMICICounterfactualAttentionModule.compute(model, "B", prog_bar=False)
    ls = cf.calculate_length_scales(sample_threshold=0)
    assert ls.dtypes["length_scale"] == np.float64 and not ls["filtered"].any()
    strict = cf.calculate_length_scales(sample_threshold=1.0)  # no pair has every receiver within d*
    assert strict["filtered"].all() and (strict["length_scale"] == 0).all()
    fig = cf.plot_length_scale_distribution(show=False, true_length_scale=12.0, save_png=True, save_dir=tmp_path)
    assert set(fig.confidence_intervals.columns) == {"head_idx", "neighbor_label", "n", "estimate", "ci_low", "ci_high"}
    assert (tmp_path / "length_scales_B.png").exists()
    fig2 = cf.plot_length_scale_distribution(head_idxs=[0, 1], plot_kde=True, show=False)
    assert set(fig2.length_scales["head_idx"]) == {0, 1}
    assert cf.plot_counterfactual_attention_summary(0, np.linspace(0, 60, 13), show=False).axes
    # numeric or categorical columns only
    ci = cf.length_scale_confidence_intervals(n_bootstrap=200)
    assert isinstance(ci["neighbor_label"].dtype, pd.CategoricalDtype)
    curves = cf.calculate_counterfactual_attention_at_distances(0, [30.0, 0.0, 10.0])
    assert isinstance(curves["query_label"].dtype, pd.CategoricalDtype) and curves["neighbor_idx"].dtype == np.int64
    # distances in any order: the curves are drawn against the right distances (attention decays with them)
    fig = cf.plot_counterfactual_attention_summary(0, [30.0, 0.0, 10.0], show=False)
    means = [ln for ln in fig.axes[0].lines if not ln.get_label().startswith("_")]
    assert means and all(np.all(np.diff(ln.get_xdata()) > 0) and np.all(np.diff(ln.get_ydata()) < 0) for ln in means)


# ---------------------------------------------------------------------------- explained variance
def test_explained_variance_schema_reference_and_best_heads(model, expl_var):
    df = expl_var.explained_variance
    G, H = model.adata.n_vars, SMALL["n_heads"]
    assert list(df.columns) == ["head", "ct_name", "gene", "expl_var_head_gene", "expl_var_head", "p_value_head",
                                "p_value_adj_head"]
    assert len(df) == H * 4 * G
    assert all(df[c].dtype == np.float64 for c in ["expl_var_head_gene", "expl_var_head", "p_value_head", "p_value_adj_head"])
    assert df["head"].dtype == np.int64
    assert df["p_value_head"].gt(0).all() and df["p_value_head"].le(1).all()
    assert (df["p_value_adj_head"] >= df["p_value_head"] - 1e-12).all()
    # reference: head h alone for the A cells, in plain numpy
    adata = model.adata
    rows = np.flatnonzero(adata.obs["cell_type"] == "A")
    with torch.inference_mode():
        gen = model.module.eval()(model._store(adata).batch(torch.as_tensor(rows)), compute_loss=False)[1]
    x = adata.X[rows].astype(np.float64)
    hr = gen["head_residuals"].double().numpy()
    base = gen["prediction"].double().numpy() - hr.sum(1)
    for h in (0, 2):
        err = base + hr[:, h] - x
        ref_gene = 1 - err.var(0) / x.var(0)
        got = df[(df["ct_name"] == "A") & (df["head"] == h)].set_index("gene").loc[adata.var_names]
        np.testing.assert_allclose(got["expl_var_head_gene"], ref_gene, rtol=1e-6, atol=1e-8)
        assert got["expl_var_head"].iloc[0] == pytest.approx(1 - err.var(0).sum() / x.var(0).sum(), rel=1e-6)
    # receivers of planted effects are explained; those without incoming effects are not
    summ = expl_var.head_summary().groupby("ct_name", observed=True)["expl_var_head"].max()
    assert min(summ["A"], summ["B"]) > 0.05 > max(summ["C"], summ["D"])
    best = expl_var.max_explained_variance_heads()
    assert best.index.tolist() == ["A", "B", "C", "D"] and best.dtype == np.int64
    assert best["A"] == expl_var.compute_max_explained_variance_head("A")
    with pytest.raises(ValueError, match="cell_type"):
        expl_var.compute_max_explained_variance_head("Z")


def test_explained_variance_permutation_test_options_and_plots(model, expl_var, tmp_path):
    no_test = AMICIExplainedVarianceModule.compute(model, run_permutation_test=False, prog_bar=False)
    assert "p_value_head" not in no_test.explained_variance.columns
    np.testing.assert_allclose(no_test.explained_variance["expl_var_head_gene"],
                               expl_var.explained_variance["expl_var_head_gene"], rtol=1e-6, atol=1e-9)
    few = AMICIExplainedVarianceModule.compute(model, n_permutations=9, prog_bar=False)
    assert set(np.round(few.explained_variance["p_value_head"] * 10).astype(int)) <= set(range(1, 11))
    with pytest.raises(ValueError, match="alpha"):
        AMICIExplainedVarianceModule.compute(model, alpha=2.0)
    with pytest.raises(ValueError, match="n_permutations"):
        AMICIExplainedVarianceModule.compute(model, n_permutations=0)
    assert expl_var.plot_explained_variance_barplot(show=False, save_png=True, save_dir=tmp_path).axes
    assert expl_var.plot_featurewise_explained_variance_heatmap(cell_type_sub=["A", "B"], n_top_genes=5, show=False).axes
    assert (tmp_path / "explained_variance_barplot.png").exists()


# ---------------------------------------------------------------------------- attention patterns
def test_attention_patterns_flavours_schema_and_save(model, tmp_path):
    van = AMICIAttentionModule.compute(model, prog_bar=False)
    assert van._labels_key == "cell_type" and van._flavor == "vanilla"
    df = van.attention_patterns
    n, H = model.adata.n_obs, SMALL["n_heads"]
    assert list(df.columns) == [*(f"neighbor_{k}" for k in range(K)), "head_idx", "label", "cell_idx"]
    assert len(df) == n * H and df["neighbor_0"].dtype == np.float32 and df["head_idx"].dtype == np.int64
    assert isinstance(df["label"].dtype, pd.CategoricalDtype)
    a = df[[f"neighbor_{k}" for k in range(K)]].to_numpy()
    assert (a >= 0).all() and (a.sum(1) < 1).all()  # the dummy keeps some weight
    assert van._nn_idxs_df.loc["cell_5"].tolist() == list(model.adata.obs_names[model.adata.obsm["_nn_idx"][5]])
    np.testing.assert_array_equal(van._nn_dists_df.loc["cell_5"].to_numpy(), model.adata.obsm["_nn_dist"][5])
    # the same numbers twice; a subset gives the same rows
    again = AMICIAttentionModule.compute(model, prog_bar=False, batch_size=97)
    np.testing.assert_allclose(again._attention, van._attention, rtol=1e-5, atol=1e-7)
    sub = AMICIAttentionModule.compute(model, indices=[5, 7], prog_bar=False)
    np.testing.assert_allclose(sub._attention, van._attention[[5, 7]], rtol=1e-5, atol=1e-7)
    # flavours: the vanilla pattern times a per-(neighbour, head) weight
    contrib = model.module.value_contributions(torch.as_tensor(model.adata.X)).detach()
    gene_w = contrib.norm(dim=-1).numpy()  # (N, H)
    nn_idx = model.adata.obsm["_nn_idx"]
    gw = AMICIAttentionModule.compute(model, flavor="gene-weighted", prog_bar=False)
    np.testing.assert_allclose(gw._attention, van._attention * gene_w[nn_idx].transpose(0, 2, 1), rtol=1e-4, atol=1e-7)
    for flavor in ("value-weighted", "info-weighted"):
        f = AMICIAttentionModule.compute(model, flavor=flavor, indices=np.arange(300), prog_bar=False)
        ratio = f._attention / np.maximum(van._attention[:300], 1e-30)
        assert (f._attention >= 0).all() and not np.allclose(ratio, 1.0)
    with pytest.raises(ValueError, match="flavor"):
        AMICIAttentionModule.compute(model, flavor="fancy")
    with pytest.raises(ValueError, match="indices"):
        AMICIAttentionModule.compute(model, indices=[n + 5])
    van.save(tmp_path / "att.csv")
    back = pd.read_csv(tmp_path / "att.csv")
    assert back.shape == df.shape
    np.testing.assert_allclose(back["neighbor_3"], df["neighbor_3"], rtol=1e-6)


def test_attention_summary_hubs_and_plot(model, tmp_path):
    att = AMICIAttentionModule.compute(model, prog_bar=False)
    binned = att.binned_attention("A", 0, max_distance=60, bin_size=10, min_bin_count=20)
    assert list(binned.columns) == ["distance_bin", "neighbor_label", "count", "mean", "sd"]
    assert binned["count"].ge(20).all() and binned["count"].dtype == np.int64
    # A receivers attend more to nearby B senders than to distant ones, and more than to the decoy
    head = int(np.argmax([att.binned_attention("A", h, 60, 10, 20).query("neighbor_label == 'B'")["mean"].max()
                          for h in range(SMALL["n_heads"])]))
    b = att.binned_attention("A", head, 60, 10, 20).query("neighbor_label == 'B'").set_index("distance_bin")["mean"]
    d = att.binned_attention("A", head, 60, 10, 20).query("neighbor_label == 'D'")["mean"]
    assert b.iloc[0] > 2 * b.iloc[-1] and b.iloc[0] > 2 * d.max()
    fig = att.plot_attention_summary(cell_type_sub=["A", "B"], sel_head=head, plot_histogram=True, show=False,
                                     save_png=True, save_dir=tmp_path, max_distance=60, min_bin_count=20)
    assert len(fig.axes) == 4 and (tmp_path / "attention_summary.png").exists()
    # palette (dict), bin_size, epoch (in the file name) and save_svg
    pal = {"A": "red", "B": "blue", "C": "green", "D": "black"}
    fig = att.plot_attention_summary(cell_type_sub=["A"], sel_head=head, palette=pal, bin_size=20, max_distance=60,
                                     min_bin_count=20, epoch=3, show=False, save_svg=True, save_dir=tmp_path)
    bars = [c for c in fig.axes[0].containers if c.get_label() == "B"]
    line = bars[0].lines[0]  # the data line of B's error bars: bins of 20 drawn at their centres
    assert np.allclose(line.get_xdata(), [10.0, 30.0, 50.0][: len(line.get_xdata())])
    assert matplotlib.colors.same_color(line.get_color(), "blue")
    assert (tmp_path / "attention_summary_epoch3.svg").exists()
    with pytest.raises(ValueError, match="palette"):
        att.plot_attention_summary(palette={"A": "red"}, show=False)
    assert len(att.plot_attention_summary(show=False).axes) == 4 * SMALL["n_heads"]
    with pytest.raises(ValueError, match="sel_head"):
        att.plot_attention_summary(sel_head=7, show=False)
    with pytest.raises(ValueError, match="cell_type_sub"):
        att.plot_attention_summary(cell_type_sub=["Q"], show=False)
    with pytest.raises(ValueError, match="wandb"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            att.plot_attention_summary(sel_head=0, wandb_log=True, show=False)
        else:
            raise ValueError("wandb is installed")
    hubs = att.compute_communication_hubs()
    assert list(hubs.columns) == ["A", "B", "C", "D", "hub_cluster"]
    assert hubs.index.equals(model.adata.obs_names) and hubs["hub_cluster"].dtype == np.int64
    comp = hubs[["A", "B", "C", "D"]].to_numpy()
    assert np.allclose(comp.sum(1)[comp.sum(1) > 0], 1.0) and (comp.dtype == np.float64)
    assert 2 <= hubs["hub_cluster"].nunique() <= 12
    # an A cell's high-attention neighbours are never A (neighbours are other-type cells)
    assert (hubs.loc[model.adata.obs["cell_type"].to_numpy() == "A", "A"] == 0).all()
    fixed = att.compute_communication_hubs(n_clusters=3, attention_quantile_threshold=0.5)
    assert fixed["hub_cluster"].nunique() == 3
    with pytest.raises(ValueError, match="attention_quantile_threshold"):
        att.compute_communication_hubs(attention_quantile_threshold=1.0)


# ---------------------------------------------------------------------------- calibration
@pytest.mark.slow
def test_no_planted_effect_few_significant_tests(null_model):
    ab = AMICIAblationModule.compute(null_model, compute_z_value=True, prog_bar=False)
    df = ab.ablation_scores
    adj = np.concatenate([df[f"{s}_nl10_pval_adj"].to_numpy() for s in "ABCD"])
    raw = np.concatenate([df[f"{s}_nl10_pval"].to_numpy() for s in "ABCD"])
    adj, raw = adj[~np.isnan(adj)], raw[~np.isnan(raw)]
    assert np.mean(adj > -math.log10(0.05)) < 0.02
    assert np.mean(raw > -math.log10(0.05)) < 0.08
    assert ab.get_interaction_weight_matrix().to_numpy().sum() <= 3
    # explained variance on a fresh null tissue (held out): the permutation test is calibrated
    fresh = _setup(simulate_spatial(n_cells=1500, n_genes=60, interactions=None, seed=6))
    ev = AMICIExplainedVarianceModule.compute(null_model, adata=fresh, prog_bar=False)
    summ = ev.head_summary()
    assert (summ["p_value_adj_head"] < 0.05).mean() <= 0.125
    assert summ["expl_var_head"].max() < 0.01


def test_model_methods_delegate(model):
    if not hasattr(AMICI, "get_neighbor_ablation_scores"):
        pytest.fail("AMICI has no interpretation methods")
    out = model.get_neighbor_ablation_scores(cell_type="A", ablated_neighbor_ct_sub=["B"], prog_bar=False)
    assert isinstance(out, AMICIAblationModule)
    assert isinstance(model.get_attention_patterns(indices=[0, 1], prog_bar=False), AMICIAttentionModule)
    assert isinstance(model.get_counterfactual_attention_patterns("A", head_idxs=[0], prog_bar=False),
                      AMICICounterfactualAttentionModule)
    ev = model.get_expl_variance_scores(run_permutation_test=False, prog_bar=False)
    assert isinstance(ev, AMICIExplainedVarianceModule)
