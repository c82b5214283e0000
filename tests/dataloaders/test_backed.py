"""Training from a backed (on-disk) AnnData read in contiguous chunks."""

import anndata
import numpy as np
import pytest
import scvi
import torch
from scvi.dataloaders import AnnDataLoader
from scvi.model import SCVI

from cellvi.data import simulate_ambient
from cellvi.dataloaders import BackedDataLoader, DataPathMixin, DataSplitter, make_data_loader


class FastSCVI(DataPathMixin, SCVI):
    pass


class FastInferenceSCVI(DataPathMixin, SCVI):
    _data_loader_cls = staticmethod(make_data_loader)


class CountingLoader(BackedDataLoader):
    """Records the row ranges read from disk."""

    def _read(self, start, stop, local):
        self.reads.append((start, stop))
        return super()._read(start, stop, local)


@pytest.fixture(scope="module")
def memory():
    adata, _ = simulate_ambient(n_cells=500, n_genes=30, n_empty=10, n_damaged=0, n_batches=2, seed=4)
    return adata


@pytest.fixture(scope="module", params=["csr", "dense"])
def pair(request, memory, tmp_path_factory):
    """The same registered data in memory and backed on disk."""
    adata = memory.copy()
    if request.param == "dense":
        adata.X = adata.X.toarray()
    path = tmp_path_factory.mktemp("backed") / f"{request.param}.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(adata, batch_key="batch")
    SCVI.setup_anndata(backed, batch_key="batch")
    yield SCVI(adata).adata_manager, SCVI(backed).adata_manager
    backed.file.close()


def _same(reference, ours):
    assert len(reference) == len(ours)
    for a, b in zip(reference, ours, strict=True):
        assert list(a) == list(b)
        for key in a:
            assert b[key].dtype == a[key].dtype and b[key].shape == a[key].shape
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_sequential_batches_equal_scvi_and_keep_the_order_of_indices(pair):
    in_memory, backed = pair
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(500, 333, replace=False))
    reference = list(AnnDataLoader(in_memory, indices=indices, batch_size=64))
    _same(
        reference,
        list(BackedDataLoader(backed, indices=indices, batch_size=64, chunk_size=70, buffer_chunks=2)),
    )
    # unsorted indices: minibatches follow their order (scvi's loader sorts each backed minibatch)
    unsorted = rng.permutation(indices)
    reference = list(AnnDataLoader(in_memory, indices=unsorted, batch_size=64))
    _same(reference, list(BackedDataLoader(backed, indices=unsorted, batch_size=64, chunk_size=70)))


def test_shuffled_epochs_read_each_chunk_once_and_visit_every_cell(pair):
    in_memory, backed = pair
    indices = np.random.default_rng(1).choice(500, 400, replace=False)
    X = in_memory.adata.X
    X = X.toarray() if hasattr(X, "toarray") else X
    loader = CountingLoader(
        backed, indices=indices, batch_size=48, shuffle=True, chunk_size=64, buffer_chunks=2
    )
    epochs = []
    for _ in range(2):
        loader.reads = []
        batches = list(loader)
        assert [b["X"].shape[0] for b in batches] == [48] * 8 + [16]
        assert all(stop - start <= 64 for start, stop in loader.reads)  # never more than a chunk
        assert len(loader.reads) == len(set(loader.reads)) == 8  # each chunk once (500 rows / 64)
        seen = torch.cat([b["X"] for b in batches]).numpy()
        np.testing.assert_array_equal(np.sort(seen.sum(1)), np.sort(X[indices].sum(1)))
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


def test_distributed_ranks_share_the_cells(pair):
    _, backed = pair
    loaders = [
        BackedDataLoader(
            backed,
            batch_size=50,
            shuffle=True,
            distributed_sampler=True,
            num_replicas=2,
            rank=r,
            chunk_size=64,
        )
        for r in range(2)
    ]
    for dl in loaders:
        dl.set_epoch(3)
    seen = [torch.cat([b["X"] for b in dl]) for dl in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 5 and seen[0].shape[0] == seen[1].shape[0] == 250
    X = backed.adata.X[:]
    X = X.toarray() if hasattr(X, "toarray") else X
    np.testing.assert_array_equal(np.sort(torch.cat(seen).numpy().sum(1)), np.sort(X.sum(1)))


def test_training_from_backed_data(memory, tmp_path):
    path = tmp_path / "train.h5ad"
    memory.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    scvi.settings.seed = 0
    FastSCVI.setup_anndata(backed, batch_key="batch")
    splitter = DataSplitter(FastSCVI(backed).adata_manager, batch_size=64)
    splitter.setup()
    assert splitter.resolved_data_path == "backed"
    assert isinstance(splitter.train_dataloader(), BackedDataLoader)

    models = {}
    for name, adata in (("backed", backed), ("memory", memory.copy())):
        scvi.settings.seed = 0
        FastSCVI.setup_anndata(adata, batch_key="batch")
        model = FastSCVI(adata, n_latent=3, n_hidden=16)
        model.train(max_epochs=8, batch_size=64, check_val_every_n_epoch=1, enable_progress_bar=False)
        models[name] = model
    assert type(models["backed"].trainer.train_dataloader).__name__ == "BackedDataLoader"
    elbo = {k: m.history["elbo_validation"].to_numpy(dtype=float).ravel() for k, m in models.items()}
    # it learns, and as well as in memory (the minibatch order differs, so not identically)
    assert elbo["backed"][-1] < 0.9 * elbo["backed"][0]
    assert abs(elbo["backed"][-1] - elbo["memory"][-1]) < 0.05 * elbo["memory"][-1]
    backed.file.close()


def test_backed_errors(pair):
    _, backed = pair
    from cellvi.dataloaders import resolve_data_path

    assert resolve_data_path("auto", backed, "cpu") == "backed"
    with pytest.raises(ValueError, match="needs the registered data in memory"):
        resolve_data_path("device", backed, "cpu")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        BackedDataLoader(backed, chunk_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        BackedDataLoader(backed, chunksize=10)


def test_get_methods_on_the_fast_path_keep_the_order_of_indices(memory, tmp_path):
    """Latent means from in-memory and backed data, any index order, equal scvi's in-memory ones."""
    adata = memory.copy()
    scvi.settings.seed = 0
    FastInferenceSCVI.setup_anndata(adata, batch_key="batch")
    model = FastInferenceSCVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    path = tmp_path / "infer.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    order = np.random.default_rng(3).permutation(adata.n_obs)[:200]

    reference = model.get_latent_representation(dataloader=AnnDataLoader(model.adata_manager, batch_size=64))
    loader = model._make_data_loader(adata=adata, indices=order, batch_size=64)
    assert type(loader).__name__ == "DeviceDataLoader"
    np.testing.assert_allclose(
        model.get_latent_representation(indices=order, batch_size=64), reference[order], rtol=1e-5
    )
    loader = model._make_data_loader(adata=backed, indices=order, batch_size=64)
    assert type(loader).__name__ == "BackedDataLoader"
    np.testing.assert_allclose(
        model.get_latent_representation(backed, indices=order, batch_size=64), reference[order], rtol=1e-5
    )
    # scvi's loader sorts each backed minibatch, so its rows no longer match ``indices``
    scvi_backed = AnnDataLoader(model.get_anndata_manager(backed), indices=order, batch_size=64)
    assert not np.allclose(model.get_latent_representation(dataloader=scvi_backed), reference[order])
    backed.file.close()
