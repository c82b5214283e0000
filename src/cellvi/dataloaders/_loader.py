"""Device-resident minibatch loader, a drop-in for scvi-tools' ``AnnDataLoader``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ._sampler import MinibatchSampler
from ._store import TensorStore, keys_and_dtypes

# keyword arguments of torch's DataLoader that scvi passes along; they have no meaning here
# (no worker processes: a minibatch is a few array operations on the data's device)
_IGNORED_DATALOADER_KWARGS = frozenset(
    {
        "num_workers",
        "persistent_workers",
        "pin_memory",
        "pin_memory_device",
        "prefetch_factor",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "generator",
        "in_order",
        "collate_fn",
    }
)


def _as_indices(indices, n_obs: int, arg: str = "indices") -> np.ndarray:
    """Integer positions from ``None``, a boolean mask or integer indices, validated."""
    if indices is None:
        return np.arange(n_obs)
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n_obs,):
            raise ValueError(f"{arg} as a boolean mask must have length n_obs={n_obs}; got {indices.shape}.")
        return np.flatnonzero(indices)
    if indices.size == 0:
        return indices.astype(np.int64)
    if not np.issubdtype(indices.dtype, np.integer):
        if np.issubdtype(indices.dtype, np.floating) and np.all(np.mod(indices, 1) == 0):
            indices = indices.astype(np.int64)
        else:
            raise ValueError(
                f"{arg} must hold integer positions or a boolean mask; got dtype {indices.dtype}."
            )
    indices = indices.ravel().astype(np.int64)
    if indices.min() < -n_obs or indices.max() >= n_obs:
        raise ValueError(
            f"{arg} must be positions in [0, {n_obs}); got values in [{indices.min()}, {indices.max()}]."
        )
    return np.where(indices < 0, indices + n_obs, indices)


def _distributed_defaults(num_replicas, rank) -> tuple[int, int]:
    """World size and rank from ``torch.distributed`` when not given (as DistributedSampler)."""
    if num_replicas is None or rank is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(
                "distributed_sampler=True needs an initialised torch.distributed process group, "
                "or explicit num_replicas and rank."
            )
        num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
        rank = torch.distributed.get_rank() if rank is None else rank
    return int(num_replicas), int(rank)


class DeviceDataLoader:
    """Minibatches of a registered AnnData object gathered on a device.

    A drop-in for :class:`scvi.dataloaders.AnnDataLoader`: the same arguments, and the same
    batches (a dict of tensors with the same keys, dtypes and shapes, in the same order for the
    same seed on the CPU). The registered arrays are read once into a :class:`TensorStore` on the
    data's device (sparse matrices stay CSR); each minibatch is gathered there with array
    operations and only its rows are made dense.

    Parameters
    ----------
    adata_manager
        :class:`~scvi.data.AnnDataManager` object with a registered AnnData object.
    indices
        The indices of the observations in ``adata_manager.adata`` to load (integer positions or
        a boolean mask). ``None`` loads all observations.
    batch_size
        Minibatch size to load each iteration. If ``distributed_sampler`` is ``True``, refers to
        the minibatch size per replica.
    shuffle
        Whether the dataset should be shuffled prior to sampling.
    sampler
        Optional iterable of minibatches of positions into ``indices`` (as scvi's custom
        samplers); replaces the built-in :class:`MinibatchSampler`.
    drop_last
        If ``True`` and the dataset is not evenly divisible by ``batch_size``, the last incomplete
        batch is dropped.
    drop_dataset_tail
        Only used if ``distributed_sampler`` is ``True``: cut the dataset to a multiple of the
        number of replicas instead of padding it.
    data_and_attributes
        Registry keys to load (list) or keys and numpy dtypes (dict); ``None`` loads all
        registered data with float32 for continuous and int64 for categorical fields.
    iter_ndarray
        Whether to yield numpy arrays instead of torch tensors.
    distributed_sampler
        Whether to give each process its share of the minibatches
        (:class:`~torch.utils.data.DistributedSampler` semantics). The world size and rank are
        ``num_replicas`` and ``rank`` or, when not given, those of ``torch.distributed``.
    load_sparse_tensor
        Accepted for compatibility with scvi: minibatches are always dense (only the minibatch
        is densified, on the device), so the result is the same either way.
    device
        Device the minibatches are returned on. Default: the device of ``store``, else the CPU.
    stream
        If ``False`` (default), the registered arrays are held on ``device``. If ``True``, they
        stay on the CPU and each compact (still sparse) minibatch is copied to ``device``
        through pinned memory, then made dense there.
    store
        A :class:`TensorStore` to share between loaders (train / validation / test) so that the
        data are held once. Built from ``adata_manager`` when ``None``.
    num_replicas, rank
        Number of processes and this process's rank, for ``distributed_sampler``.
    seed
        Seed of the shuffle: ``None`` draws each epoch's seed from torch's global generator
        (scvi's default behaviour); an integer makes the order a function of ``seed + epoch``
        only (as :class:`~torch.utils.data.DistributedSampler`, and the default 0 when
        distributed).
    draw_base_seed
        Whether each iteration makes the draw from torch's global generator that torch's
        ``DataLoader`` makes (its workers' base seed), so that seeded training consumes torch's
        generator as with scvi's loader (default). :func:`make_data_loader` turns it off for the
        ``get_*`` methods: a sampling method then gives the same draws whether it is called once
        or chunk by chunk.
    **kwargs
        Keyword arguments of :class:`torch.utils.data.DataLoader` that scvi passes on
        (``num_workers``, ``pin_memory``, ``persistent_workers`` ...) are accepted and have no
        effect; there are no worker processes.

    Examples
    --------
    >>> import scvi
    >>> from cellvi.data import simulate_ambient
    >>> from cellvi.dataloaders import DeviceDataLoader
    >>> adata, _ = simulate_ambient(n_cells=300, n_genes=50, n_empty=100, n_damaged=0)
    >>> scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    >>> manager = scvi.model.SCVI(adata).adata_manager
    >>> batch = next(iter(DeviceDataLoader(manager, batch_size=64, shuffle=True)))
    >>> batch["X"].shape, batch["batch"].dtype
    (torch.Size([64, 50]), torch.int64)
    """

    def __init__(
        self,
        adata_manager,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        sampler=None,
        drop_last: bool = False,
        drop_dataset_tail: bool = False,
        data_and_attributes: list[str] | dict | None = None,
        iter_ndarray: bool = False,
        distributed_sampler: bool = False,
        load_sparse_tensor: bool = False,
        *,
        device: torch.device | str | None = None,
        stream: bool = False,
        store: TensorStore | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int | None = None,
        draw_base_seed: bool = True,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _IGNORED_DATALOADER_KWARGS)
        if unknown:
            raise TypeError(f"DeviceDataLoader got unexpected keyword arguments {unknown}.")
        if sampler is not None and distributed_sampler:
            raise ValueError("Cannot specify both `sampler` and `distributed_sampler`.")
        self.adata_manager = adata_manager
        n_obs = adata_manager.adata.n_obs
        self.indices = _as_indices(indices, n_obs)
        self.keys_and_dtypes = keys_and_dtypes(adata_manager, data_and_attributes)
        self.iter_ndarray = bool(iter_ndarray)
        self.load_sparse_tensor = bool(load_sparse_tensor)
        self.draw_base_seed = bool(draw_base_seed)

        if store is None:
            if device is None:
                device = "cpu"
            store_device = "cpu" if stream else device
            store = TensorStore(adata_manager, data_and_attributes, device=store_device)
        else:
            missing = [k for k in self.keys_and_dtypes if k not in store.keys_and_dtypes]
            if missing:
                raise ValueError(f"store does not hold the requested keys {missing}.")
        self.store = store
        self.device = store.device if device is None else torch.device(device)
        # fields the shared store holds with another dtype than this loader asks for
        self._casts = {
            key: _TORCH_DTYPES[dtype]
            for key, dtype in self.keys_and_dtypes.items()
            if store.keys_and_dtypes[key] != dtype
        }
        self._rows = torch.as_tensor(self.indices, dtype=torch.int64, device=store.device)

        if sampler is None:
            if distributed_sampler:
                num_replicas, rank = _distributed_defaults(num_replicas, rank)
            sampler = MinibatchSampler(
                len(self.indices),
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                device=store.device,
                num_replicas=1 if num_replicas is None else num_replicas,
                rank=0 if rank is None else rank,
                seed=seed,
                drop_dataset_tail=drop_dataset_tail,
            )
        self.sampler = sampler
        # minibatches come whole from the sampler (Lightning inspects these attributes)
        self.batch_sampler = None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def n_obs(self) -> int:
        """Number of observations the loader draws from."""
        return len(self.indices)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._batches()

    def _batches(self, seed_drawn: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        # Runs on the first ``next``: Lightning calls ``iter`` once just to check the loader.
        if self.draw_base_seed and not seed_drawn:
            _draw_base_seed()
        keys = list(self.keys_and_dtypes)
        if isinstance(self.sampler, MinibatchSampler):
            order = self.sampler.epoch_order()
            sizes = self.sampler.batch_sizes()
            rows = torch.index_select(self._rows, 0, order)
            nnz = self.store.batch_nnz(rows, sizes)
            starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            batches = (
                (rows[starts[i] : starts[i + 1]], {k: v[i] for k, v in nnz.items()})
                for i in range(len(sizes))
            )
        else:
            batches = (
                (self._rows[torch.as_tensor(pos, dtype=torch.int64, device=self._rows.device)], None)
                for pos in self.sampler
            )
        for batch_rows, batch_nnz in batches:
            batch = self.store.gather(batch_rows, self.device, nnz=batch_nnz, keys=keys)
            for key, dtype in self._casts.items():
                batch[key] = batch[key].to(dtype)
            batch = self.augment(batch, batch_rows)
            if self.iter_ndarray:
                batch = {key: value.cpu().numpy() for key, value in batch.items()}
            yield batch

    def augment(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add fields to a minibatch; override in a subclass (the default returns ``batch``).

        ``rows`` are the minibatch's positions in the AnnData object (on the store's device).
        Every process holds the whole store, also in distributed training, so a subclass can
        gather any rows, e.g. the expression of each cell's spatial neighbours::

            class NeighbourLoader(DeviceDataLoader):
                def augment(self, batch, rows):
                    batch["nn_x"] = self.store.rows("X", batch["nn_idx"].long()).to(self.device)
                    return batch
        """
        return batch


def _draw_base_seed() -> None:
    """The draw from torch's global generator that torch's DataLoader makes per iteration.

    Making it too keeps seeded training identical to scvi's default loader.
    """
    torch.empty((), dtype=torch.int64).random_()


_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}
