"""The splitters split like scvi's, and training on the device path equals training on scvi's."""

import anndata
import numpy as np
import pytest
import scvi
import torch
from scvi.dataloaders import DataSplitter as ScviDataSplitter
from scvi.dataloaders import SemiSupervisedDataSplitter as ScviSemiSupervisedDataSplitter
from scvi.model import SCANVI, SCVI

from cellvi.data import simulate_ambient
from cellvi.dataloaders import (
    DataPathMixin,
    DataSplitter,
    DeviceDataLoader,
    SemiSupervisedDataPathMixin,
    SemiSupervisedDataSplitter,
    SemiSupervisedDeviceDataLoader,
    resolve_data_path,
    with_data_path,
)


class FastSCVI(DataPathMixin, SCVI):
    pass


class FastSCANVI(SemiSupervisedDataPathMixin, SCANVI):
    pass


@pytest.fixture(scope="module")
def adata():
    adata, _ = simulate_ambient(n_cells=302, n_genes=40, n_empty=10, n_damaged=0, n_batches=2, seed=2)
    return adata


@pytest.fixture(scope="module")
def manager(adata):
    adata = adata.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata).adata_manager


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # train_size None: 0.9, a last minibatch of < 3 cells moves to validation
        {"batch_size": 135},
        {"train_size": 0.8, "validation_size": 0.1},
        {"train_size": 0.7, "shuffle_set_split": False},
        {"external_indexing": [np.arange(0, 200), np.arange(200, 250), np.arange(250, 302)]},
    ],
)
def test_split_equals_scvi(manager, kwargs):
    reference = ScviDataSplitter(manager, **kwargs)
    ours = DataSplitter(manager, **kwargs)
    reference.setup()
    ours.setup()
    assert (ours.n_train, ours.n_val) == (reference.n_train, reference.n_val)
    for name in ("train_idx", "val_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(reference, name))
    assert ours.resolved_data_path == "device"
    train = ours.train_dataloader()
    assert isinstance(train, DeviceDataLoader) and train.n_obs == ours.n_train
    val, test = ours.val_dataloader(), ours.test_dataloader()
    assert (val is None) == (len(reference.val_idx) == 0) and (test is None) == (len(reference.test_idx) == 0)
    if val is not None:
        assert val.store is train.store  # the data are held once


def test_small_last_minibatch_moves_to_validation(manager):
    # 302 cells: 0.9 -> 272 training cells, 272 % 135 = 2 < 3 -> 2 cells go to validation
    splitter = DataSplitter(manager, batch_size=135)
    splitter.setup()
    assert (splitter.n_train, splitter.n_val) == (270, 32)
    assert [b["X"].shape[0] for b in splitter.train_dataloader()] == [135, 135]


def test_scvi_path_uses_scvi_loader_and_bad_path_errors(manager):
    splitter = DataSplitter(manager, data_path="scvi")
    splitter.setup()
    assert type(splitter.train_dataloader()).__name__ == "AnnDataLoader"
    with pytest.raises(ValueError, match="data_path must be one of"):
        DataSplitter(manager, data_path="gpu")


def _train(cls, adata, data_path, **setup):
    scvi.settings.seed = 0
    cls.setup_anndata(adata, **setup)
    model = cls(adata, n_latent=3, n_hidden=16)
    model.train(
        max_epochs=3, batch_size=64, data_path=data_path, check_val_every_n_epoch=1, enable_progress_bar=False
    )
    return model


def test_seeded_training_identical_to_scvi_loader(adata):
    """Same seed: the same minibatches and random draws, hence the same losses and latent space."""
    adata = adata.copy()
    runs = {path: _train(FastSCVI, adata, path, batch_key="batch") for path in ("scvi", "device", "stream")}
    assert type(runs["device"].trainer.train_dataloader).__name__ == "DeviceDataLoader"
    reference = runs["scvi"]
    latent = reference.get_latent_representation()
    for path in ("device", "stream"):
        for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train"):
            np.testing.assert_allclose(
                runs[path].history[key].to_numpy(dtype=float),
                reference.history[key].to_numpy(dtype=float),
                rtol=1e-5,
            )
        np.testing.assert_allclose(runs[path].get_latent_representation(), latent, rtol=1e-4, atol=1e-5)
    # and training did something: the ELBO fell
    assert (
        reference.history["elbo_train"].to_numpy(dtype=float)[-1]
        < reference.history["elbo_train"].to_numpy(dtype=float)[0]
    )


@pytest.fixture(scope="module")
def labelled(adata):
    adata = adata.copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    rng = np.random.default_rng(0)
    adata.obs.loc[rng.random(adata.n_obs) < 0.4, "label"] = "unknown"
    return adata


def test_semi_supervised_split_and_pairs(labelled):
    adata = labelled.copy()
    SCANVI.setup_anndata(adata, labels_key="label", unlabeled_category="unknown")
    manager = SCANVI(adata).adata_manager
    reference = ScviSemiSupervisedDataSplitter(manager, train_size=0.8, batch_size=32, n_samples_per_label=10)
    ours = SemiSupervisedDataSplitter(manager, train_size=0.8, batch_size=32, n_samples_per_label=10)
    reference.setup()
    ours.setup()
    for name in ("train_idx", "val_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(reference, name))
    np.random.seed(0)
    torch.manual_seed(0)
    ref_loader = reference.train_dataloader()
    ref_steps = []
    for step in ref_loader:
        ref_steps.append(step)
        if len(ref_steps) == len(ref_loader.dataloaders[1]):
            break  # scvi replays cached minibatches after this; cellvi reshuffles
    np.random.seed(0)
    torch.manual_seed(0)
    loader = ours.train_dataloader()
    assert isinstance(loader, SemiSupervisedDeviceDataLoader)
    steps = list(loader)
    assert len(steps) == len(ref_loader) == len(loader)
    for (a_full, a_lab), (b_full, b_lab) in zip(ref_steps, steps, strict=False):
        torch.testing.assert_close(b_full["X"], a_full["X"], rtol=0, atol=0)
        torch.testing.assert_close(b_lab["labels"], a_lab["labels"], rtol=0, atol=0)
    # up to 10 cells of each of the 5 labelled classes, all labelled, all from the training set
    labelled_idx = loader.labelled.indices
    labels = adata.obs["label"].to_numpy()
    assert len(labelled_idx) <= 50 and np.all(labels[labelled_idx] != "unknown")
    assert np.isin(labelled_idx, ours.train_idx).all()
    loader.resample_labels()
    assert not np.array_equal(np.sort(loader.labelled.indices), np.sort(labelled_idx))


def test_semi_supervised_distributed_epoch_covers_the_rank_share(labelled):
    """Each rank's epoch follows its share of the full loader (scvi's stops at the labelled one)."""
    adata = labelled.copy()
    SCANVI.setup_anndata(adata, labels_key="label", unlabeled_category="unknown")
    manager = SCANVI(adata).adata_manager
    seen = []
    for rank in range(2):
        loader = SemiSupervisedDeviceDataLoader(
            manager,
            n_samples_per_label=5,
            shuffle=True,
            batch_size=20,
            distributed_sampler=True,
            num_replicas=2,
            rank=rank,
        )
        steps = list(loader)
        assert len(steps) == len(loader) == 8  # 151 cells per rank / 20, the labelled loader restarting
        assert all(lab["X"].shape[0] <= 20 for _, lab in steps)
        seen.append(torch.cat([full["X"] for full, _ in steps]))
    X = adata.X.toarray()
    np.testing.assert_array_equal(np.sort(torch.cat(seen).numpy().sum(1)), np.sort(X.sum(1)))


def test_semi_supervised_set_without_labelled_cells_still_yields(labelled):
    adata = labelled.copy()
    SCANVI.setup_anndata(adata, labels_key="label", unlabeled_category="unknown")
    manager = SCANVI(adata).adata_manager
    unlabelled = np.flatnonzero(adata.obs["label"].to_numpy() == "unknown")[:50]
    batches = list(SemiSupervisedDeviceDataLoader(manager, indices=unlabelled, batch_size=20))
    assert [b["X"].shape[0] for b in batches] == [20, 20, 10]  # dicts: "no labelled tensors"


def test_semi_supervised_training_identical_to_scvi_loader(labelled):
    adata = labelled.copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)  # all labelled: no replay in scvi
    runs = {
        path: _train(FastSCANVI, adata, path, labels_key="label", unlabeled_category="none")
        for path in ("scvi", "device")
    }
    assert type(runs["device"].trainer.train_dataloader).__name__ == "SemiSupervisedDeviceDataLoader"
    for key in ("elbo_train", "train_classification_loss", "elbo_validation"):
        np.testing.assert_allclose(
            runs["device"].history[key].to_numpy(dtype=float),
            runs["scvi"].history[key].to_numpy(dtype=float),
            rtol=1e-5,
        )
    np.testing.assert_array_equal(runs["device"].predict(), runs["scvi"].predict())


def test_auto_rule(adata, tmp_path):
    adata = adata.copy()
    SCVI.setup_anndata(adata)
    manager = SCVI(adata).adata_manager
    assert resolve_data_path("auto", manager, "cpu") == "device"
    assert resolve_data_path("scvi", manager, "cpu") == "scvi"
    assert resolve_data_path("stream", manager, "cpu") == "stream"
    csc = adata.copy()
    csc.X = csc.X.tocsc()
    path = tmp_path / "csc.h5ad"
    csc.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(backed)
    backed_manager = SCVI(backed).adata_manager
    # CSC on disk: rows are not contiguous, so auto falls back to scvi's loader
    assert resolve_data_path("auto", backed_manager, "cpu") == "scvi"
    with pytest.raises(ValueError, match="data_path='backed' needs"):
        resolve_data_path("backed", backed_manager, "cpu")
    backed.file.close()


def test_with_data_path_copies_and_checks():
    user = {"drop_last": True}
    out = with_data_path(user, "device")
    assert out == {"drop_last": True, "data_path": "device"} and user == {"drop_last": True}
    assert with_data_path({"data_path": "scvi"})["data_path"] == "scvi"
    with pytest.raises(ValueError, match="data_path must be one of"):
        with_data_path(None, "cuda")
