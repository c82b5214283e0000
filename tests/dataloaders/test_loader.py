"""DeviceDataLoader gives scvi's AnnDataLoader batches; the store gathers rows correctly."""

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse
from scvi.dataloaders import AnnDataLoader, BatchDistributedSampler

from cellvi.data import simulate_ambient
from cellvi.dataloaders import DeviceDataLoader, MinibatchSampler, TensorStore


def _register(adata):
    scvi.model.SCVI.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["depth"],
    )
    return scvi.model.SCVI(adata).adata_manager


@pytest.fixture(scope="module")
def toy():
    adata, _ = simulate_ambient(n_cells=300, n_genes=40, n_empty=10, n_damaged=0, n_batches=2, seed=1)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2", "d3"], adata.n_obs))
    adata.obs["depth"] = np.log1p(np.asarray(adata.X.sum(1)).ravel())
    return adata


@pytest.fixture(scope="module", params=["csr", "csc", "dense"])
def manager(request, toy):
    adata = toy.copy()
    if request.param == "csc":
        adata.X = sparse.csc_matrix(adata.X)
    elif request.param == "dense":
        adata.X = adata.X.toarray()
    return _register(adata)


def _assert_same_batches(reference, ours):
    assert len(reference) == len(ours)
    for a, b in zip(reference, ours, strict=True):
        assert list(a) == list(b)
        for key in a:
            assert b[key].dtype == a[key].dtype, key
            assert b[key].shape == a[key].shape, key
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_equal_scvi_loader(manager, backend, shuffle, drop_last):
    # "torch" is the accelerator gather (CSR tensors, array operations), exercised here on the CPU
    store = TensorStore(manager, sparse_backend=backend)
    indices = np.random.default_rng(1).permutation(manager.adata.n_obs)[:217]
    torch.manual_seed(3)
    reference = list(
        AnnDataLoader(manager, indices=indices, batch_size=50, shuffle=shuffle, drop_last=drop_last)
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(3)
    ours = list(
        DeviceDataLoader(
            manager, indices=indices, batch_size=50, shuffle=shuffle, drop_last=drop_last, store=store
        )
    )
    _assert_same_batches(reference, ours)
    # the same draws from the global generator: seeded training continues identically
    assert torch.equal(torch.random.get_rng_state(), state)
    assert set(reference[0]) >= {"X", "batch", "labels", "extra_categorical_covs", "extra_continuous_covs"}


def test_boolean_mask_subset_keys_and_ndarray(manager):
    mask = np.zeros(manager.adata.n_obs, dtype=bool)
    mask[::3] = True
    keys = {"X": np.float64, "batch": np.int32}
    reference = list(
        AnnDataLoader(manager, indices=mask, batch_size=40, data_and_attributes=keys, iter_ndarray=True)
    )
    ours = list(
        DeviceDataLoader(manager, indices=mask, batch_size=40, data_and_attributes=keys, iter_ndarray=True)
    )
    assert len(ours) == len(reference) == 3
    for a, b in zip(reference, ours, strict=True):
        assert set(b) == {"X", "batch"}
        for key in a:
            assert isinstance(b[key], np.ndarray) and b[key].dtype == a[key].dtype
            np.testing.assert_array_equal(b[key], a[key])


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_shared_store_serves_loaders_and_neighbour_gathers(manager, backend):
    store = TensorStore(manager, sparse_backend=backend)
    X = manager.adata.X
    X = X.toarray() if sparse.issparse(X) else X
    neighbours = torch.as_tensor(np.random.default_rng(2).integers(0, manager.adata.n_obs, (7, 5)))
    gathered = store.rows("X", neighbours)
    assert gathered.shape == (7, 5, X.shape[1])
    np.testing.assert_array_equal(gathered.numpy(), X[neighbours.numpy()])
    a = DeviceDataLoader(manager, indices=np.arange(10), batch_size=4, store=store)
    b = DeviceDataLoader(manager, indices=np.arange(10, 20), batch_size=4, store=store)
    assert a.store is b.store and len(a) == 3
    np.testing.assert_array_equal(next(iter(b))["X"].numpy(), X[10:14])
    with pytest.raises(ValueError, match="not held by this store"):
        store.rows("nope", neighbours)


class NeighbourLoader(DeviceDataLoader):
    def augment(self, batch, rows):
        batch["nn_x"] = self.store.rows("X", batch["nn_idx"].long()).to(self.device)
        return batch


def test_augment_gathers_neighbours_from_the_full_store_on_every_rank(toy):
    """A spatial model's neighbour gather: each rank holds all cells, so any neighbour is there."""
    from scvi.data import AnnDataManager
    from scvi.data.fields import LayerField, ObsmField

    adata = toy.copy()
    rng = np.random.default_rng(5)
    adata.obsm["nn_idx"] = rng.integers(0, adata.n_obs, (adata.n_obs, 6))
    manager = AnnDataManager(fields=[LayerField("X", None), ObsmField("nn_idx", "nn_idx")])
    manager.register_fields(adata)
    X = adata.X.toarray()
    for rank in range(2):
        loader = NeighbourLoader(
            manager, batch_size=40, shuffle=True, distributed_sampler=True, num_replicas=2, rank=rank
        )
        for batch in loader:
            nn = batch["nn_idx"].long().numpy()
            assert batch["nn_x"].shape == (nn.shape[0], 6, X.shape[1])
            np.testing.assert_array_equal(batch["nn_x"].numpy(), X[nn])


def test_compact_rows_rebuilt_on_arrival(toy):
    """The streaming path sends compact CSR rows and rebuilds them where they arrive."""
    from cellvi.dataloaders._store import PackedBatch

    manager = _register(toy.copy())
    store = TensorStore(manager, ["X"])
    rows = torch.tensor([5, 0, 299, 17, 17])
    packed = store.take(rows)
    part = packed.csr["X"]
    assert part.cols.shape[0] == manager.adata.X[rows.numpy()].nnz  # only the rows' non-zeros
    part.matrix = None  # as after a copy to another device: only crow / cols / vals are there
    rebuilt = store.densify(PackedBatch({}, {"X": part}, 5))["X"]
    np.testing.assert_array_equal(rebuilt.numpy(), manager.adata.X[rows.numpy()].toarray())


def test_unsorted_duplicate_csr_entries_are_summed_like_scipy():
    # a non-canonical CSR (duplicate column entries) must densify like scipy's toarray
    data = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    indices = np.array([2, 0, 2, 1])
    indptr = np.array([0, 3, 4, 4])
    X = sparse.csr_matrix((data, indices, indptr), shape=(3, 3))
    X.has_canonical_format = False
    import anndata

    adata = anndata.AnnData(X=X)
    scvi.model.SCVI.setup_anndata(adata)
    manager = scvi.model.SCVI(adata).adata_manager
    for backend in ("scipy", "torch"):
        store = TensorStore(manager, sparse_backend=backend)
        batch = next(iter(DeviceDataLoader(manager, batch_size=3, store=store)))
        np.testing.assert_array_equal(batch["X"].numpy(), X.toarray())
    assert X.data.tolist() == [1.0, 2.0, 3.0, 4.0]  # the user's matrix is untouched


@pytest.mark.parametrize("drop_dataset_tail", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_order_matches_scvi_batch_distributed_sampler(shuffle, drop_dataset_tail):
    n, bs = 103, 16
    for rank in range(3):
        reference = BatchDistributedSampler(
            range(n),
            batch_size=bs,
            num_replicas=3,
            rank=rank,
            shuffle=shuffle,
            drop_dataset_tail=drop_dataset_tail,
        )
        ours = MinibatchSampler(
            n, batch_size=bs, shuffle=shuffle, num_replicas=3, rank=rank, drop_dataset_tail=drop_dataset_tail
        )
        for epoch in (0, 4):
            reference.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert [b.tolist() for b in ours] == [list(b) for b in reference]
            assert len(ours) == len(reference)


def test_ranks_split_each_single_process_minibatch():
    """Rank minibatch k of R ranks x B == minibatch k of one process x R*B, same seed and epoch."""
    n, bs, world = 200, 16, 2
    single = MinibatchSampler(n, batch_size=bs * world, shuffle=True, seed=7)
    ranks = [
        MinibatchSampler(n, batch_size=bs, shuffle=True, seed=7, num_replicas=world, rank=r)
        for r in range(world)
    ]
    for s in [single, *ranks]:
        s.set_epoch(2)
    single_batches = list(single)
    rank_batches = [list(r) for r in ranks]
    assert len(single_batches) == len(rank_batches[0]) == len(rank_batches[1])
    for k, batch in enumerate(single_batches):
        union = torch.cat([rank_batches[r][k] for r in range(world)])
        assert sorted(union.tolist()) == sorted(batch.tolist())
    # a new epoch gives a new order
    single.set_epoch(3)
    assert [b.tolist() for b in single] != [b.tolist() for b in single_batches]


def test_distributed_loader_gives_each_rank_its_share(manager):
    loaders = [
        DeviceDataLoader(
            manager, batch_size=32, shuffle=True, distributed_sampler=True, num_replicas=2, rank=r
        )
        for r in range(2)
    ]
    seen = [np.concatenate([b["X"].numpy() for b in dl]) for dl in loaders]
    assert seen[0].shape[0] == seen[1].shape[0] == manager.adata.n_obs // 2
    X = manager.adata.X
    X = X.toarray() if sparse.issparse(X) else X
    # together the ranks visit every cell exactly once (n_obs is even: no padding)
    together = np.concatenate(seen)
    assert np.array_equal(np.sort(together.sum(1)), np.sort(X.sum(1)))


def test_bad_input_errors(manager):
    n = manager.adata.n_obs
    with pytest.raises(ValueError, match=r"indices must be positions in \[0, 300\)"):
        DeviceDataLoader(manager, indices=[0, n])
    with pytest.raises(ValueError, match="boolean mask must have length"):
        DeviceDataLoader(manager, indices=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        DeviceDataLoader(manager, batch_size=0)
    with pytest.raises(ValueError, match="data_and_attributes names"):
        DeviceDataLoader(manager, data_and_attributes=["X", "not_registered"])
    with pytest.raises(ValueError, match="rank must be in"):
        DeviceDataLoader(manager, distributed_sampler=True, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="process group"):
        DeviceDataLoader(manager, distributed_sampler=True)
    with pytest.raises(ValueError, match="sparse_backend must be"):
        TensorStore(manager, sparse_backend="cupy")
    with pytest.raises(TypeError, match="unexpected keyword"):
        DeviceDataLoader(manager, shuffel=True)
