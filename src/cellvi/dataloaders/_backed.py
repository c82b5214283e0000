"""Minibatches streamed from an on-disk (backed) AnnData in contiguous chunks.

Random access to single rows of an HDF5 matrix (what scvi's loader does for backed data, one
minibatch of scattered rows at a time) is slow. This loader reads contiguous blocks of
``chunk_size`` rows, keeps the rows it needs, and shuffles at two levels: the order of the
chunks, and the rows within a buffer of ``buffer_chunks`` chunks. Memory use is bounded by one
buffer: at most ``chunk_size * buffer_chunks`` rows in their on-disk storage (CSR stays CSR) plus
one dense minibatch. The matrix is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from cellvi._validation import check_positive_int

from ._loader import _IGNORED_DATALOADER_KWARGS, _as_indices, _distributed_defaults, _draw_base_seed
from ._store import keys_and_dtypes


def backed_supported(adata_manager, data_and_attributes=None) -> bool:
    """Whether every field to load is in memory or an on-disk dense / CSR array."""
    from anndata.abc import CSRDataset

    for key in keys_and_dtypes(adata_manager, data_and_attributes):
        data = adata_manager.get_from_registry(key)
        if isinstance(data, np.ndarray | pd.DataFrame | CSRDataset) or sparse.issparse(data):
            continue
        if type(data).__module__.startswith(("h5py", "zarr")) and len(getattr(data, "shape", ())) == 2:
            continue
        return False
    return True


def _concat(parts: list):
    if not parts:
        return None
    if sparse.issparse(parts[0]):
        return sparse.vstack(parts, format="csr")
    return np.concatenate(parts, axis=0)


class BackedDataLoader:
    """Minibatches of a registered, backed (on-disk) AnnData, read in contiguous chunks.

    The batches are the dicts of tensors of scvi's ``AnnDataLoader`` (same keys, dtypes and
    shapes). Without shuffling and with sorted ``indices`` they are identical to scvi's; with
    shuffling every selected observation is visited once per epoch in a block-shuffled order
    (chunk order permuted, rows permuted within a buffer of chunks).

    Parameters
    ----------
    adata_manager
        :class:`~scvi.data.AnnDataManager` of a backed AnnData (in-memory fields such as ``obs``
        columns are read from memory, on-disk matrices in chunks).
    indices
        The indices of the observations to load; ``None`` loads all.
    batch_size
        Minibatch size (per replica when distributed).
    shuffle
        Whether to block-shuffle the observations each epoch. Without shuffling, minibatches
        follow the order of ``indices``.
    drop_last
        Drop the last incomplete minibatch.
    data_and_attributes
        Registry keys to load (list) or keys and numpy dtypes (dict); ``None`` loads all.
    iter_ndarray
        Whether to yield numpy arrays instead of torch tensors.
    distributed_sampler
        Give each process its share of the observations (``DistributedSampler`` semantics:
        a permutation from ``seed + epoch``, padded to a multiple of the number of replicas).
    load_sparse_tensor
        Accepted for compatibility; minibatches are always dense.
    device
        Device of the returned minibatches (copied through pinned memory to a GPU).
    chunk_size
        Rows read from disk at once.
    buffer_chunks
        Chunks whose rows are shuffled together.
    num_replicas, rank, seed, draw_base_seed
        As for :class:`DeviceDataLoader`.
    **kwargs
        torch ``DataLoader`` keyword arguments passed by scvi; they have no effect.
    """

    def __init__(
        self,
        adata_manager,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        data_and_attributes=None,
        iter_ndarray: bool = False,
        distributed_sampler: bool = False,
        load_sparse_tensor: bool = False,
        *,
        device: torch.device | str | None = None,
        chunk_size: int = 8192,
        buffer_chunks: int = 4,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int | None = None,
        drop_dataset_tail: bool = False,
        draw_base_seed: bool = True,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _IGNORED_DATALOADER_KWARGS - {"store", "stream"})
        if unknown:
            raise TypeError(f"BackedDataLoader got unexpected keyword arguments {unknown}.")
        self.adata_manager = adata_manager
        self.n_total = adata_manager.adata.n_obs
        self.indices = _as_indices(indices, self.n_total)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.buffer_chunks = check_positive_int(buffer_chunks, "buffer_chunks")
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.iter_ndarray = bool(iter_ndarray)
        self.load_sparse_tensor = bool(load_sparse_tensor)
        self.draw_base_seed = bool(draw_base_seed)
        self.device = torch.device("cpu" if device is None else device)
        self.keys_and_dtypes = keys_and_dtypes(adata_manager, data_and_attributes)
        self._fields = {}
        for key in self.keys_and_dtypes:
            data = adata_manager.get_from_registry(key)
            if isinstance(data, pd.DataFrame):
                data = data.to_numpy()
            self._fields[key] = data
        if distributed_sampler:
            num_replicas, rank = _distributed_defaults(num_replicas, rank)
        self.num_replicas = 1 if num_replicas is None else check_positive_int(num_replicas, "num_replicas")
        self.rank = 0 if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}); got {rank}.")
        self.distributed = self.num_replicas > 1
        self.seed = 0 if seed is None else int(seed)
        self.drop_dataset_tail = bool(drop_dataset_tail)
        self.epoch = 0
        self.sampler = self  # Lightning calls ``sampler.set_epoch``
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (the distributed share and order depend on ``seed + epoch``)."""
        self.epoch = int(epoch)

    @property
    def n_obs(self) -> int:
        """Observations this process visits per epoch."""
        if not self.distributed:
            return len(self.indices)
        n = len(self.indices)
        if self.drop_dataset_tail and n % self.num_replicas:
            return -(-(n - self.num_replicas) // self.num_replicas)
        return -(-n // self.num_replicas)

    def __len__(self) -> int:
        n, bs = self.n_obs, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def _epoch_rows(self) -> np.ndarray:
        """This process's rows for the epoch (global positions, possibly repeated by padding)."""
        rows = self.indices
        if not self.distributed:
            return rows
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(rows), generator=g).numpy() if self.shuffle else np.arange(len(rows))
        total = self.n_obs * self.num_replicas
        perm = np.resize(perm, total) if total > len(perm) else perm[:total]
        return rows[perm[self.rank : total : self.num_replicas]]

    def _read(self, start: int, stop: int, local: np.ndarray) -> dict:
        """Rows ``start + local`` of every field; on-disk fields read as one contiguous block."""
        out = {}
        for key, data in self._fields.items():
            if isinstance(data, np.ndarray):
                out[key] = data[start + local]
            else:
                out[key] = data[start:stop][local]
        return out

    def _buffers(self, rows: np.ndarray, rng: np.random.Generator | None) -> Iterator[dict]:
        """Blocks of rows (dict of per-field arrays), in the epoch's order."""
        if rng is None and np.any(np.diff(rows) < 0):
            # an unsorted order without shuffling: read each minibatch's rows sorted, then reorder
            for s in range(0, len(rows), self.batch_size):
                part = rows[s : s + self.batch_size]
                order = np.argsort(part, kind="stable")
                sorted_rows = part[order]
                unique, inverse = np.unique(sorted_rows, return_inverse=True)
                block = {}
                for key, data in self._fields.items():
                    block[key] = data[unique][inverse]
                back = np.empty_like(order)
                back[order] = np.arange(len(order))
                yield {key: value[back] for key, value in block.items()}
            return
        sorted_rows = np.sort(rows)
        chunk_of = sorted_rows // self.chunk_size
        chunks, starts = np.unique(chunk_of, return_index=True)
        bounds = np.append(starts, len(sorted_rows))
        order = rng.permutation(len(chunks)) if rng is not None else np.arange(len(chunks))
        for g in range(0, len(order), self.buffer_chunks):
            parts = []
            for c in order[g : g + self.buffer_chunks]:
                mine = sorted_rows[bounds[c] : bounds[c + 1]]
                start = int(chunks[c]) * self.chunk_size
                stop = min(start + self.chunk_size, self.n_total)
                parts.append(self._read(start, stop, mine - start))
            block = {key: _concat([p[key] for p in parts]) for key in self._fields}
            if rng is not None:
                perm = rng.permutation(block_len(block))
                block = {key: value[perm] for key, value in block.items()}
            yield block

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._batches()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.draw_base_seed:
            _draw_base_seed()  # as torch's DataLoader (see DeviceDataLoader)
        rng = None
        if self.shuffle:
            if self.distributed:
                rng = np.random.default_rng(self.seed + self.epoch)
            else:
                rng = np.random.default_rng(int(torch.empty((), dtype=torch.int64).random_().item()))
        rows = self._epoch_rows()
        bs = self.batch_size
        pending = None
        n_yielded, n_batches = 0, len(self)
        for block in self._buffers(rows, rng):
            if pending is not None:
                block = {key: _concat([pending[key], block[key]]) for key in block}
            n = block_len(block)
            full = n - n % bs
            for s in range(0, full, bs):
                if n_yielded == n_batches:
                    return
                yield self._to_batch({key: value[s : s + bs] for key, value in block.items()})
                n_yielded += 1
            pending = {key: value[full:] for key, value in block.items()} if full < n else None
        if pending is not None and not self.drop_last and n_yielded < n_batches:
            yield self._to_batch(pending)

    def _to_batch(self, block: dict) -> dict:
        out = {}
        pin = self.device.type == "cuda"
        for key, dtype in self.keys_and_dtypes.items():
            value = block[key]
            value = value.toarray() if sparse.issparse(value) else np.asarray(value)
            value = value.astype(dtype, copy=False)
            if value.ndim == 1:
                value = value[:, None]
            if self.iter_ndarray:
                out[key] = value
                continue
            t = torch.from_numpy(np.ascontiguousarray(value))
            if pin:
                t = t.pin_memory()
            out[key] = t.to(self.device, non_blocking=pin)
        return out


def block_len(block: dict) -> int:
    """Number of rows of a block (dict of per-field arrays)."""
    return next(iter(block.values())).shape[0]
