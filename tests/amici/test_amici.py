"""Tests of cellvi.AMICI and cellvi.data.simulate_spatial on simulated tissues with planted interactions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

from cellvi.amici import AMICI, AttentionPenaltyMonitor
from cellvi.amici._data import NeighborStore
from cellvi.amici._evaluate import attention_by_sender_type, heldout_errors
from cellvi.data import simulate_spatial

SMALL = dict(
    n_heads=4, n_head_size=16, n_query_dim=32, n_query_embed_hidden=64,
    n_nn_embed=64, n_nn_embed_hidden=128, n_kv_dim=64, n_pos_coef_mlp_hidden=32,
)  # fmt: skip
TINY = dict(
    n_heads=2, n_head_size=8, n_query_dim=8, n_query_embed_hidden=16,
    n_nn_embed=16, n_nn_embed_hidden=16, n_kv_dim=16, n_pos_coef_mlp_hidden=8,
)  # fmt: skip
K = 15


def _setup(adata, **kw):
    AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=K, **kw)
    return adata


@pytest.fixture(scope="module")
def tissue():
    return simulate_spatial(n_cells=2000, n_genes=80, seed=3)


@pytest.fixture(scope="module")
def trained(tissue):
    """AMICI trained on the left 80% of the tissue (the right strip is held out)."""
    scvi.settings.seed = 0
    x = tissue.obsm["spatial"][:, 0]
    left = x < np.quantile(x, 0.8)
    region = _setup(tissue[left].copy())
    model = AMICI(region, **SMALL)
    model.train(max_epochs=30, enable_progress_bar=False)
    return model, np.flatnonzero(~left)


# ---------------------------------------------------------------------------- simulator
def test_simulator_is_seeded_and_documents_truth():
    a, b = (
        simulate_spatial(n_cells=300, n_genes=60, seed=5),
        simulate_spatial(n_cells=300, n_genes=60, seed=5),
    )
    c = simulate_spatial(n_cells=300, n_genes=60, seed=6)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.obsm["spatial"], c.obsm["spatial"])
    inter = a.uns["interactions"]
    assert list(inter["sender"]) == ["B", "A"][:0] + ["B", "C"] and list(inter["receiver"]) == ["A", "B"]
    for row in inter.itertuples():
        targets = row.targets.split(",")
        assert (a.var.loc[targets, "target_of"] == f"{row.sender}->{row.receiver}").all()
        assert (a.var.loc[targets, "effect_sign"] == row.sign).all()
    assert (a.var["target_of"] != "").sum() == 2 * 8
    # only receivers interact, and only near a sender
    strength = a.obs["interaction_strength"]
    assert (strength[a.obs["cell_type"].isin(["C", "D"])] == 0).all()
    is_a = a.obs["cell_type"] == "A"
    assert (strength[is_a & (a.obs["dist_to_B"] > 40)] < 0.01).all()
    assert a.uns["decoy"] == "D" and not a.var["target_of"].str.contains("D").any()
    # planted effect visible: targets of B->A are up in interacting A cells
    tg = a.var["target_of"] == "B->A"
    X = np.asarray(a.X)
    up = X[(is_a & a.obs["interacting"]).to_numpy()][:, tg.to_numpy()].mean()
    rest = X[(is_a & ~a.obs["interacting"]).to_numpy()][:, tg.to_numpy()].mean()
    assert up > rest + 0.3


def test_simulator_null_and_sparse_options():
    null = simulate_spatial(n_cells=300, n_genes=60, interactions=None, seed=1)
    assert (null.var["target_of"] == "").all() and (null.obs["interaction_strength"] == 0).all()
    assert len(null.uns["interactions"]) == 0
    dense = simulate_spatial(n_cells=300, n_genes=60, seed=2)
    sp = simulate_spatial(n_cells=300, n_genes=60, seed=2, sparse=True)
    assert sparse.issparse(sp.X) and sparse.issparse(sp.layers["counts"])
    np.testing.assert_array_equal(sp.X.toarray(), dense.X)
    with pytest.raises(ValueError, match="n_genes"):
        simulate_spatial(n_cells=300, n_genes=10)
    with pytest.raises(ValueError, match="interactions"):
        simulate_spatial(n_cells=300, interactions=[("A", "A", 10.0, 1)])


# ---------------------------------------------------------------------------- set-up
def test_neighbors_are_nearest_other_type_cells(tissue):
    a = _setup(tissue.copy())
    idx, dist = a.obsm["_nn_idx"], a.obsm["_nn_dist"]
    assert idx.shape == (a.n_obs, K) and dist.shape == (a.n_obs, K) and a.uns["n_neighbors"] == K
    codes = a.obs["cell_type"].cat.codes.to_numpy()
    assert (codes[idx] != codes[:, None]).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    coords = a.obsm["spatial"].astype(np.float64)
    for i in (0, 17, 1234):  # brute force on a few cells
        d = np.linalg.norm(coords - coords[i], axis=1)
        d[codes == codes[i]] = np.inf
        np.testing.assert_allclose(np.sort(d)[:K], dist[i], rtol=1e-5)


def test_sparse_and_dense_setup_give_identical_neighbors(tissue):
    dense = _setup(tissue.copy())
    sp = tissue.copy()
    sp.X = sparse.csr_matrix(sp.X)
    _setup(sp)
    np.testing.assert_array_equal(dense.obsm["_nn_idx"], sp.obsm["_nn_idx"])
    np.testing.assert_array_equal(dense.obsm["_nn_dist"], sp.obsm["_nn_dist"])
    # the sparse gather densifies exactly the same rows
    labels = dense.obs["cell_type"].cat.codes.to_numpy()
    s1 = NeighborStore(dense.X, labels, dense.obsm["_nn_idx"], dense.obsm["_nn_dist"])
    s2 = NeighborStore(sp.X, labels, sp.obsm["_nn_idx"], sp.obsm["_nn_dist"])
    rows = torch.tensor([5, 0, 1999, 5, 42])
    torch.testing.assert_close(s1.rows(rows), s2.rows(rows))
    b1, b2 = s1.batch(rows), s2.batch(rows)
    torch.testing.assert_close(b1["nn_x_unique"][b1["nn_inverse"]], b2["nn_x_unique"][b2["nn_inverse"]])
    torch.testing.assert_close(b1["nn_x_unique"][b1["nn_inverse"]], torch.as_tensor(dense.X)[b1["nn_idx"]])


def test_setup_registers_obsm_arrays_quietly(tissue, caplog):
    # scvi-tools logged "Generating sequential column names" once per obsm field and call
    import logging

    with caplog.at_level(logging.INFO, logger="scvi"):
        a = _setup(tissue.copy())
        AMICI(a)
    assert "sequential column names" not in caplog.text
    manager = AMICI._get_most_recent_anndata_manager(a, required=True)
    for key in ("coordinates", "nn_idx", "nn_dist"):
        names = [v for k, v in manager.registry["field_registries"].items() if k.endswith(key)]
        assert names, key
        cols = names[0]["state_registry"]["column_names"]
        np.testing.assert_array_equal(cols, np.arange(len(cols)))


def test_cell_radius_gives_surface_distances(tissue):
    a = _setup(tissue.copy())
    b = _setup(tissue.copy(), cell_radius_key="cell_radius")
    r = tissue.obs["cell_radius"].to_numpy()
    expect = np.clip(a.obsm["_nn_dist"] - r[:, None] - r[a.obsm["_nn_idx"]], 0, None)
    # same neighbour sets (K nearest by centre), re-sorted by surface distance
    np.testing.assert_allclose(np.sort(expect, axis=1), b.obsm["_nn_dist"], rtol=1e-5, atol=1e-5)
    assert (b.obsm["_nn_dist"] <= a.obsm["_nn_dist"] + 1e-6).all()


def test_setup_errors_name_the_argument(tissue):
    a = tissue.copy()
    with pytest.raises(ValueError, match="labels_key"):
        AMICI.setup_anndata(a, coord_obsm_key="spatial")
    with pytest.raises(ValueError, match="view"):
        AMICI.setup_anndata(a[:100], labels_key="cell_type", coord_obsm_key="spatial")
    with pytest.raises(ValueError, match="coord_obsm_key='xy'"):
        AMICI.setup_anndata(a, labels_key="cell_type", coord_obsm_key="xy")
    with pytest.raises(ValueError, match="n_neighbors"):
        AMICI.setup_anndata(a, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=0)
    bad = a.copy()
    bad.obsm["spatial"][3, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        AMICI.setup_anndata(bad, labels_key="cell_type", coord_obsm_key="spatial")
    # a type with too few cells of *other* types: say which and how many
    few = a[:40].copy()
    few.obs["cell_type"] = pd.Categorical(["A"] * 35 + ["B"] * 5)
    with pytest.raises(ValueError, match=r"'A' has 5"):
        AMICI.setup_anndata(few, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=10)
    with pytest.raises(ValueError, match="Unknown model_kwargs"):
        AMICI(_setup(a), n_head=3)


# ---------------------------------------------------------------------------- trained model
def test_heldout_region_reconstruction_beats_cell_type_means(trained, tissue):
    model, held_out = trained
    full = tissue.copy()  # whole tissue, never set up: neighbours are computed from the model's set-up
    model_err, base_err = heldout_errors(model, full, held_out)
    assert "_nn_idx" in full.obsm and full.obsm["_nn_idx"].shape == (full.n_obs, K)
    assert model_err < 0.97 * base_err, (model_err, base_err)
    rec = model.get_reconstruction_error(full, indices=held_out)["reconstruction_loss"]
    assert float(rec) == pytest.approx(model_err, rel=1e-4)
    assert float(model.get_elbo(full, indices=held_out)) == pytest.approx(-model_err, rel=1e-4)


@pytest.mark.slow
def test_no_planted_effect_gives_no_improvement_over_type_means():
    # calibration: without interactions the neighbours carry no information on the receiver's expression
    # (a model that leaked the receiver's own expression into its prediction would fail this)
    scvi.settings.seed = 0
    null = simulate_spatial(n_cells=1500, n_genes=80, interactions=None, seed=4)
    x = null.obsm["spatial"][:, 0]
    left = x < np.quantile(x, 0.8)
    model = AMICI(_setup(null[left].copy()), **SMALL)
    model.train(max_epochs=15, enable_progress_bar=False)
    model_err, base_err = heldout_errors(model, null.copy(), np.flatnonzero(~left))
    assert model_err > 0.99 * base_err, (model_err, base_err)


def test_attention_finds_planted_senders_not_decoy(trained, tissue):
    model, _ = trained
    full = tissue.copy()
    for inter in tissue.uns["interactions"].itertuples():
        att = attention_by_sender_type(model, full, inter.receiver, "cell_type", inter.length_scale)
        others = att.drop(columns=[inter.sender, inter.receiver])
        head = (att[inter.sender] / others.max(axis=1)).idxmax()  # the head most specific to the sender
        sender = att.loc[head, inter.sender]
        assert sender > 0.05, att
        assert sender > 5 * others.loc[head].max(), att  # non-senders, including the decoy D
        # near the planted distance rather than far away
        far = attention_by_sender_type(model, full, inter.receiver, "cell_type", 1e9).loc[head, inter.sender]
        assert sender > 1.5 * far


def test_predictions_shapes_deterministic_and_residuals(trained):
    model, _ = trained
    p1 = model.get_predictions(prog_bar=False)
    p2 = model.get_predictions(prog_bar=False, batch_size=77)
    assert p1.shape == (model.adata.n_obs, model.adata.n_vars) and p1.dtype == np.float32
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-5)
    res = model.get_predictions(indices=[3, 1, 2], get_residuals=True, prog_bar=False)
    codes = model.adata.obs["cell_type"].cat.codes.to_numpy()[[3, 1, 2]]
    np.testing.assert_allclose(p1[[3, 1, 2]] - res, model.module.ct_profiles.numpy()[codes], atol=1e-5)
    emb = model.get_nn_embed(indices=np.arange(10))
    assert emb.shape == (10, SMALL["n_nn_embed"])
    with pytest.raises(TypeError, match="no latent variable"):
        model.get_latent_representation()
    with pytest.raises(TypeError, match="no latent variable"):
        model.get_marginal_ll()


def test_ct_profiles_are_training_cell_means(trained):
    model, _ = trained
    X = np.asarray(model.adata.X)[model.train_indices]
    codes = model.adata.obs["cell_type"].cat.codes.to_numpy()[model.train_indices]
    expect = np.stack([X[codes == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(model.module.ct_profiles.numpy(), expect, rtol=1e-4, atol=1e-5)


def test_save_load_identical_dense_and_sparse(trained, tmp_path):
    model, _ = trained
    model.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="already exists"):
        model.save(str(tmp_path / "m"))
    expect = model.get_predictions(prog_bar=False)
    sp = model.adata.copy()
    sp.X = sparse.csr_matrix(sp.X)
    for adata in (model.adata.copy(), sp):
        loaded = AMICI.load(str(tmp_path / "m"), adata=adata)
        np.testing.assert_array_equal(loaded.get_predictions(prog_bar=False), expect)


def test_module_outputs_and_interpretation_hooks(trained):
    model, _ = trained
    module = model.module.eval()
    batch = next(iter(model._make_data_loader(model.adata, np.arange(64), 64)))
    with torch.inference_mode():
        _, gen = module(batch, compute_loss=False)
        B, H = 64, SMALL["n_heads"]
        att, scores = gen["attention"], gen["attention_scores"]
        assert att.shape == scores.shape == (B, H, K + 1)
        torch.testing.assert_close(att.sum(-1), torch.ones(B, H))
        assert (scores[..., -1] == module.dummy_score).all()
        labels = batch["labels"].reshape(-1)
        torch.testing.assert_close(
            gen["residual"], module.type_offset[labels] + gen["head_residuals"].sum(1), rtol=1e-5, atol=1e-5
        )
        # (c)/(d): counterfactual scores of the same receivers and neighbours equal the forward's
        nn_x = batch["nn_x_unique"][batch["nn_inverse"]]
        hook = module.attention_scores(labels, nn_x, batch["nn_dist"])
        torch.testing.assert_close(hook["scores"], scores[..., :-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(module.distance_coefficients(labels, nn_x), gen["distance_coef"])
        assert (gen["distance_coef"] > 0).all()
        # (e): head residuals are the attention-weighted value contributions
        vc = module.value_contributions(batch["nn_x_unique"])[batch["nn_inverse"]]  # (B, K, H, G)
        torch.testing.assert_close(
            torch.einsum("bhk,bkhg->bhg", att[..., :-1], vc), gen["head_residuals"], rtol=1e-4, atol=1e-4
        )
        # (b): removing every neighbour leaves the dummy only and the type offset as residual
        _, none = module(
            batch, compute_loss=False, generative_kwargs={"neighbor_mask": torch.zeros(B, K, dtype=bool)}
        )
        torch.testing.assert_close(none["attention"][..., -1], torch.ones(B, H))
        torch.testing.assert_close(none["residual"], module.type_offset[labels])
        keep = torch.ones(B, K, dtype=bool)
        keep[:, 0] = False
        _, one = module(batch, compute_loss=False, generative_kwargs={"neighbor_mask": keep})
        assert (one["attention"][..., 0] == 0).all()
        torch.testing.assert_close(one["attention"].sum(-1), torch.ones(B, H))
        _, abl = module(
            batch, compute_loss=False, generative_kwargs={"attention_scale": keep[:, None, :].float()}
        )
        torch.testing.assert_close(abl["attention"], att)  # post-softmax scaling does not renormalise
        torch.testing.assert_close(
            abl["head_residuals"],
            torch.einsum("bhk,bkhg->bhg", att[..., :-1] * keep[:, None, :], vc),
            rtol=1e-4,
            atol=1e-4,
        )


def test_gene_residual_contributions(trained):
    model, _ = trained
    df = model.get_gene_residual_contributions(indices=[0, 5, 9], head_idxs=[1, 3])
    assert df.shape == (6, 2 + model.adata.n_vars)
    assert list(df["neighbor"]) == list(np.repeat(model.adata.obs_names[[0, 5, 9]], 2))
    assert list(df["head"]) == [1, 3, 1, 3, 1, 3]
    X = torch.as_tensor(np.asarray(model.adata.X)[[0, 5, 9]])
    with torch.inference_mode():
        expect = model.module.value_contributions(X)[:, [1, 3]].reshape(6, -1).numpy()
    np.testing.assert_allclose(df[model.adata.var_names].to_numpy(), expect, rtol=1e-5, atol=1e-6)
    assert all(df[g].dtype == np.float32 for g in model.adata.var_names[:3])
    with pytest.raises(ValueError, match="head_idxs"):
        model.get_gene_residual_contributions(head_idxs=[SMALL["n_heads"]])


# ---------------------------------------------------------------------------- training mechanics
def test_penalty_ramp_does_not_enter_early_stopping_metric(tissue):
    scvi.settings.seed = 0
    a = _setup(tissue[:600].copy())
    model = AMICI(a, value_l1_penalty_coef=1e-2, **TINY)
    cb = AttentionPenaltyMonitor(epoch_start=1, epoch_end=2, start_val=1e-3, end_val=0.5, flavor="linear")
    model.train(max_epochs=3, callbacks=[cb], early_stopping=True, enable_progress_bar=False)
    h = {k: v.to_numpy(dtype=float).ravel() for k, v in model.history.items()}  # scvi stores objects
    assert model.module.attention_penalty_coef == 0.5
    np.testing.assert_allclose(h["attention_penalty_coef_train"], [0.0, 0.001, 0.5], rtol=1e-6)
    # elbo_validation (the early-stopping monitor) is the reconstruction loss alone
    np.testing.assert_allclose(h["elbo_validation"], h["reconstruction_loss_validation"])
    # while the training loss includes the penalties
    assert h["train_loss"][-1] > h["reconstruction_loss_train"][-1] + 1e-3
    assert h["attention_penalty_train"][-1] > 0 and h["value_l1_penalty_train"][-1] > 0
    with pytest.raises(ValueError, match="flavor"):
        AttentionPenaltyMonitor(flavor="cubic")


def test_second_train_call_trains_with_dropout_and_logs_per_epoch(tissue):
    """A second ``train`` call trains the module in training mode (scvi leaves it in eval mode)."""
    from lightning.pytorch.callbacks import Callback

    class Modes(Callback):
        def __init__(self):
            self.modes = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append(all(m.training for m in pl_module.module.modules()))

    scvi.settings.seed = 0
    model = AMICI(_setup(tissue[:400].copy()), **TINY)
    model.train(max_epochs=2, enable_progress_bar=False, check_val_every_n_epoch=1)
    assert not model.module.training  # left in eval mode after training
    modes = Modes()
    model.train(max_epochs=2, enable_progress_bar=False, callbacks=[modes], check_val_every_n_epoch=1)
    assert modes.modes and all(modes.modes)
    # metrics are logged once per epoch (not per step) under scvi's names; scvi appends the second call's
    h = model.history
    assert len(h["train_loss"]) == len(h["elbo_validation"]) == 4
    assert np.isfinite(h["reconstruction_loss_train"].to_numpy(dtype=float)).all()


def test_attention_from_hidden_layer_equals_keys_and_values(trained):
    """The training path (key projection on the type queries, value projection after the attention sum)
    gives the scores and head residuals of explicit per-neighbour keys and values."""
    model, _ = trained
    module = model.module.eval()
    batch = next(iter(model._make_data_loader(model.adata, np.arange(100), 100)))
    with torch.inference_mode():
        inf, gen = module(batch, compute_loss=False)
        labels, inv = batch["labels"].reshape(-1), batch["nn_inverse"]
        q = module.queries(labels)[0]  # (B, H, D)
        base = torch.einsum("bhd,bkhd->bhk", q, inf["keys"][inv]) / np.sqrt(module.n_head_size)
        torch.testing.assert_close(gen["base_scores"], base, rtol=1e-4, atol=1e-4)
        z = torch.einsum("bhk,bkhd->bhd", gen["attention"][..., :-1], inf["values"][inv])
        torch.testing.assert_close(
            gen["head_residuals"], torch.einsum("bhd,hdg->bhg", z, module.head_out), rtol=1e-4, atol=1e-4
        )
    module.train()
    inf_train = module.inference(**module._get_inference_input(batch))
    assert "keys" not in inf_train and "values" not in inf_train  # not computed per neighbour in training
    module.eval()


def test_spatial_patch_sampler_covers_cells_and_shares_neighbours(tissue):
    from cellvi.amici._data import NeighborLoader, SpatialPatchSampler, morton_order

    coords = tissue.obsm["spatial"]
    order = morton_order(coords)
    assert sorted(order.tolist()) == list(range(tissue.n_obs))
    # consecutive cells of the order are close: far closer than consecutive cells of a random order
    step = np.linalg.norm(np.diff(coords[order], axis=0), axis=1).mean()
    rand = np.linalg.norm(np.diff(coords[np.random.default_rng(0).permutation(tissue.n_obs)], axis=0), axis=1)
    assert step < 0.2 * rand.mean()

    n = 1000
    sampler = SpatialPatchSampler(coords[:n], batch_size=64, shuffle=True, patch_size=16, seed=3)
    first = torch.cat(list(sampler))
    assert sorted(first.tolist()) == list(range(n))  # every cell once per epoch
    sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(sampler)))
    # two ranks split every minibatch of the one-process sampler with twice the minibatch size
    ranks = [
        SpatialPatchSampler(coords[:n], 32, True, patch_size=16, num_replicas=2, rank=r, seed=3)
        for r in (0, 1)
    ]
    for b, r0, r1 in zip(sampler.__class__(coords[:n], 64, True, patch_size=16, seed=3), *ranks, strict=True):
        torch.testing.assert_close(torch.cat([r0, r1]), b)

    a = _setup(tissue.copy())
    manager = AMICI(a, **TINY).adata_manager
    from cellvi.amici._data import TRAIN_FIELDS

    def mean_unique(patch_size):
        loader = NeighborLoader(
            manager, batch_size=128, shuffle=True, coords=coords, patch_size=patch_size,
            data_and_attributes=dict(TRAIN_FIELDS), seed=0,
        )  # fmt: skip
        batches = list(loader)
        rows = torch.cat([b["_indices"] for b in batches])
        assert sorted(rows.tolist()) == list(range(tissue.n_obs))
        b = batches[0]  # the gathered neighbours are the registered neighbour rows
        torch.testing.assert_close(
            b["nn_x_unique"][b["nn_inverse"]], torch.as_tensor(np.asarray(a.X))[b["nn_idx"]]
        )
        return np.mean([len(b["nn_x_unique"]) for b in batches])

    assert mean_unique(16) < 0.5 * mean_unique(1)


def test_cli_trains_and_saves(tissue, tmp_path):
    import argparse

    from cellvi.amici import _cli

    path = tmp_path / "tissue.h5ad"
    tissue[:500].copy().write_h5ad(path)
    parser = argparse.ArgumentParser()
    _cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "amici", str(path), "-o", str(tmp_path / "model"), "--labels-key", "cell_type",
            "--n-neighbors", "8", "--n-heads", "2", "--max-epochs", "2", "--quiet",
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    loaded = AMICI.load(str(tmp_path / "model"), adata=tissue[:500].copy())
    assert loaded.is_trained and loaded.module.n_heads == 2
    with pytest.raises(FileExistsError):
        args.func(args)


# ---------------------------------------------------------------------------- reference formulation
def _reference_forward(module, labels, nn_x, nn_dist, keep, x):
    """The model written plainly, per (receiver, neighbour) slot: explicit keys, values and kernel network.

    Returns the prediction and the training loss (Gaussian term plus the module's penalties).
    """
    from torch.nn import functional as F

    H, D = module.n_heads, module.n_head_size
    B, K, _ = nn_x.shape
    e = module.ct_embed.weight[labels]  # (B, E)
    qin = module.query_embed(e).view(B, H, -1)
    q = torch.einsum("bhi,hid->bhd", qin, module.query_proj) + module.query_bias
    u = module.nn_embed(nn_x)  # (B, K, n_nn)
    h = module.kv_hidden(u)
    k = module.key_proj(h).view(B, K, H, D)
    v = module.value_proj(h).view(B, K, H, D)
    base = torch.einsum("bhd,bkhd->bhk", q, k) / np.sqrt(D)
    pos = module.pos_nn(u) + module.pos_label(e)[:, None, :]
    coef = F.softplus(module.pos_out(F.relu(module.pos_norm(pos))) + module.pos_coef_offset).permute(0, 2, 1)
    scores = base - coef * nn_dist[:, None, :] / module.distance_kernel_unit_scale
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    dummy = torch.full((B, H, 1), module.dummy_score)
    att = torch.softmax(torch.cat([scores, dummy], -1), -1)
    z = torch.einsum("bhk,bkhd->bhd", att[..., :-1], v)
    residual = module.type_offset[labels] + torch.einsum("bhd,hdg->bg", z, module.head_out)
    pred = module.ct_profiles[labels] + residual
    total = 0.5 * (x - pred).pow(2).sum(-1)
    entropy = -(att * att.clamp(1e-6, 1 - 1e-6).log()).sum(-1).mean(-1)
    total = total + module.attention_penalty_coef * entropy
    total = total + module.value_l1_penalty_coef * v.abs().sum((-1, -2)).mean(-1)
    return pred, total.mean()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("penalties", [False, True])
def test_training_forward_and_gradients_equal_reference_formulation(penalties, dropout):
    """The training path (unique neighbour cells, (cell, type) pairs of the kernel network, keys and values
    reassociated, per-type queries computed once, cells and pairs with every slot dropped left out) gives
    the loss and every parameter gradient of the plain per-slot formulation with the same dropout mask."""
    from cellvi.amici._module import AMICIModule

    torch.manual_seed(0)
    C, G, B, K, N = 3, 12, 16, 6, 40
    module = AMICIModule(G, C, torch.randn(C, G), neighbor_dropout=dropout, **TINY)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))  # no zero-initialised layer: every gradient is non-trivial
    X = torch.randn(N, G)
    labels = torch.randint(0, C, (B,))
    nn_idx = torch.randint(0, N, (B, K))
    nn_dist = 3 * torch.rand(B, K)
    keep = torch.rand(B, K) > 0.2
    uniq, inverse = torch.unique(nn_idx, return_inverse=True)
    batch = {
        "X": torch.randn(B, G), "labels": labels[:, None], "nn_idx": nn_idx, "nn_dist": nn_dist,
        "nn_x_unique": X[uniq], "nn_inverse": inverse, "neighbor_mask": keep,
    }  # fmt: skip
    if penalties:  # (the value-L1 penalty makes training compute the per-cell keys and values)
        module.attention_penalty_coef, module.value_l1_penalty_coef = 0.1, 0.01
    module.train()
    torch.manual_seed(1)
    inf, gen, out = module(batch)
    loss = out.loss
    if dropout > 0:  # the same neighbour-dropout mask for the reference
        torch.manual_seed(1)
        dropout_keep = torch.rand(B, K) >= dropout
        keep = keep & dropout_keep
        n_read = len(torch.unique(inverse[dropout_keep]))
        assert n_read < len(uniq)  # some neighbour cells have every slot dropped
        # ... and are left out of the per-cell networks unless the value-L1 penalty reads them
        assert inf["nn_embed"].shape[0] == (len(uniq) if penalties else n_read)
    grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)
    pred_ref, loss_ref = _reference_forward(module, labels, X[nn_idx], nn_dist, keep, batch["X"])
    grads_ref = torch.autograd.grad(loss_ref, list(module.parameters()), allow_unused=True)
    torch.testing.assert_close(gen["prediction"], pred_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for (name, _), g, g_ref in zip(module.named_parameters(), grads, grads_ref, strict=True):
        assert g is not None and g_ref is not None, name
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
