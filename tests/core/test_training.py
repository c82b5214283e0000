"""The shared training plan: per-epoch metrics with scvi-tools' names, train mode on every fit."""

from __future__ import annotations

import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

import cellvi


class _ModeProbe(Callback):
    """Records whether every submodule is in training mode at each training step."""

    def __init__(self):
        self.all_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.all_training.append(all(m.training for m in pl_module.module.modules()))


def _fadvi():
    adata = cellvi.data.simulate_batches(n_cells=300, n_genes=60, n_batches=2, n_labels=3, seed=1)
    cellvi.FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels", unlabeled_category="Unknown")
    return cellvi.FADVI(adata, n_latent_b=4, n_latent_l=4, n_latent_r=4)


def _velovi():
    from cellvi.velovi import compute_moments, preprocess_data

    adata = cellvi.data.simulate_velocity(n_obs=300, n_vars=20, seed=1)
    compute_moments(adata, n_neighbors=20, normalize=False)
    adata = preprocess_data(adata, filter_on_r2=False)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    return cellvi.VELOVI(adata)


@pytest.mark.parametrize("make_model", [_fadvi, _velovi], ids=["fadvi", "velovi"])
def test_second_train_call_trains_every_submodule_in_training_mode(make_model):
    model = make_model()
    kw = {"max_epochs": 2, "batch_size": 64, "enable_progress_bar": False, "check_val_every_n_epoch": 1}
    model.train(**kw)
    assert not model.module.training  # scvi-tools leaves the module in eval mode after training
    probe = _ModeProbe()
    model.train(callbacks=[probe], **kw)
    assert probe.all_training and all(probe.all_training)

    history = model.history
    for key in ("train_loss", "elbo_train", "reconstruction_loss_train", "kl_local_train", "elbo_validation"):
        assert key in history, key
        values = history[key].to_numpy(dtype=float).ravel()
        assert len(values) == 4 and np.isfinite(values).all(), key  # both calls, one row per epoch
    # neither model has a global KL term, so the per-cell ELBO is reconstruction + local KL
    assert np.all(history["kl_global_train"].to_numpy(float) == 0)
    parts = history["reconstruction_loss_train"].to_numpy(float) + history["kl_local_train"].to_numpy(float)
    np.testing.assert_allclose(history["elbo_train"].to_numpy(float).ravel(), parts.ravel(), rtol=1e-5)


def test_epoch_history_gives_scvi_tools_tables():
    import pandas as pd
    import torch
    from scvi.train._logger import SimpleExperiment

    from cellvi._training import EpochHistory

    logs = [
        ({"a": torch.tensor(1.5), "b": 2.0, "epoch": 0}, None),
        ({"a": torch.tensor(2.5), "b": 3.0, "epoch": 1}, None),
        ({"c": torch.tensor(7.0), "epoch": 1}, None),
        ({"a": torch.tensor(9.5), "epoch": 1}, None),  # same epoch again: the later value wins
        ({"s": 4.0}, 12),  # no time key: the step argument
    ]
    ours, scvi_exp = EpochHistory(), SimpleExperiment()
    for metrics, step in logs:
        ours.log_metrics(dict(metrics), step)
        scvi_exp.log_metrics(dict(metrics), step)
    assert ours.data.keys() == scvi_exp.data.keys()
    for key, theirs in scvi_exp.data.items():
        pd.testing.assert_frame_equal(ours.data[key], theirs.astype("float64"))


@pytest.fixture(scope="module")
def trained_velovi():
    """One short VELOVI training with early stopping (3 epochs: the patience is never reached)."""
    model = _velovi()
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False, early_stopping=True)
    return model


def test_training_history_is_recorded_by_epoch_history(trained_velovi):
    model = trained_velovi
    from cellvi._training import EpochHistory

    assert isinstance(model.trainer.logger.experiment, EpochHistory)
    elbo = model.history["elbo_train"]
    assert elbo.index.name == "epoch" and elbo.index.tolist() == [0, 1, 2]
    assert elbo["elbo_train"].dtype == np.float64 and np.isfinite(elbo.to_numpy()).all()


def test_epoch_metrics_reach_callbacks_progress_bar_and_loggers(trained_velovi):
    # the plan hands its epoch values to Lightning directly (not through self.log): early stopping,
    # checkpoints and schedulers read trainer.callback_metrics, the bar reads progress_bar_metrics
    trainer, history = trained_velovi.trainer, trained_velovi.history
    for key in ("elbo_validation", "elbo_train", "train_loss", "validation_loss", "kl_weight"):
        assert key in trainer.callback_metrics, key
        assert float(trainer.callback_metrics[key]) == pytest.approx(float(history[key].iloc[-1, 0])), key
        assert key in trainer.logged_metrics, key
    assert set(trainer.progress_bar_metrics) == {"train_loss"}
    assert history["elbo_validation"].index.tolist() == [0, 1, 2]
    # the KL weight of each epoch is the one reached at its end (scvi-tools' linear warm-up)
    assert np.all(np.diff(history["kl_weight"].to_numpy(float).ravel()) > 0)


def _scar():
    adata, _ = cellvi.data.simulate_ambient(n_cells=120, n_genes=40, n_empty=400, seed=0)
    cellvi.SCAR.setup_anndata(adata)
    return cellvi.SCAR(adata, n_hidden=16, n_latent=4)


def _amici():
    adata = cellvi.data.simulate_spatial(n_cells=200, n_genes=40, seed=0)
    cellvi.AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=8)
    tiny = {"n_heads": 2, "n_head_size": 8, "n_query_dim": 8, "n_query_embed_hidden": 16, "n_nn_embed": 16}
    return cellvi.AMICI(adata, **tiny, n_nn_embed_hidden=16, n_kv_dim=16, n_pos_coef_mlp_hidden=8)


@pytest.mark.parametrize(
    "make_model", [_scar, _velovi, _fadvi, _amici], ids=["scar", "velovi", "fadvi", "amici"]
)
def test_explicit_callbacks_none_trains_with_early_stopping(make_model):
    # scvi-tools' Trainer appends its callbacks to `callbacks` and fails on an explicit None
    model = make_model()
    model.train(max_epochs=2, early_stopping=True, callbacks=None, enable_progress_bar=False)
    assert model.is_trained
    assert len(model.history["elbo_train"]) == 2
