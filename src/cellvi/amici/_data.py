"""Neighbour tables and the fast neighbour data path of :class:`cellvi.AMICI`.

* :func:`other_type_neighbors` computes, for every cell, its ``K`` nearest cells of another type (one
  KD-tree per cell type, no loop over cells).
* :class:`NeighborStore` keeps the expression (dense, or CSR parts when sparse), labels and neighbour
  tables of one AnnData as tensors on one device and gathers a minibatch by index: the receivers'
  rows, and the rows of the *unique* neighbour cells with an inverse index, so per-neighbour features
  are computed once per cell. Sparse expression is densified one minibatch at a time.
  :class:`NeighborBatches` yields gathered minibatches in order (the ``get_*`` methods and
  :mod:`cellvi.interpretation`).
* Training runs on the shared data path (:mod:`cellvi.dataloaders`): :class:`SpatialDataSplitter` is
  :class:`cellvi.dataloaders.DataSplitter` with :class:`NeighborLoader`, a
  :class:`~cellvi.dataloaders.DeviceDataLoader` whose ``augment`` gathers the minibatch's unique neighbour
  rows from the same :class:`~cellvi.dataloaders.TensorStore` (every process, also every DDP rank, holds
  the whole expression matrix, so any neighbour can be gathered), and whose minibatches come from
  :class:`SpatialPatchSampler`.
* :func:`morton_order` orders cells along a Z-order curve of their coordinates. Minibatches made of a few
  spatially compact patches share most of their neighbours: with K=30 and minibatches of 128, random
  minibatches have ~1,950 unique neighbour cells (3,000-cell tissue; ~3,400 at 20,000 cells), 32 patches
  of 4 cells ~1,000 and 8 patches of 16 cells ~700-780, so the per-neighbour networks, most of a training
  step, run on 2-4x fewer rows. The minibatches are correlated, though: on the benchmark tissue
  (``benchmarks/amici.py``, 10 epochs) ``patch_size=16`` ended at the baseline's held-out error in 2 of 2
  seeds and ``patch_size=4`` in 1 of 3, against 0 of 3 for random minibatches, so the default is
  ``patch_size=1`` (random minibatches) and patches are an opt-in for long runs on large tissues.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse as sp
from scipy.spatial import cKDTree

from cellvi._validation import check_positive_int
from cellvi.dataloaders import DataSplitter, DeviceDataLoader

from ._constants import AMICI_KEYS as KEYS


def other_type_neighbors(
    coords: np.ndarray,
    labels: np.ndarray,
    n_neighbors: int,
    radius: np.ndarray | None = None,
    label_names=None,
) -> tuple[np.ndarray, np.ndarray]:
    """K nearest cells of a different type for every cell.

    Parameters
    ----------
    coords
        (n, d) coordinates.
    labels
        (n,) integer type codes.
    n_neighbors
        K.
    radius
        Optional (n,) cell radii: distances become surface distances ``max(d - r_i - r_j, 0)`` and each
        row is re-sorted by them.
    label_names
        Names of the codes, for error messages.

    Returns
    -------
    ``(nn_idx, nn_dist)``: (n, K) int64 row indices and (n, K) float32 distances, ascending per row.
    """
    n = coords.shape[0]
    codes, counts = np.unique(labels, return_counts=True)
    short = [(c, n - k) for c, k in zip(codes, counts, strict=True) if n - k < n_neighbors]
    if short:
        name = (lambda c: label_names[c]) if label_names is not None else (lambda c: c)
        detail = ", ".join(f"{name(c)!r} has {m}" for c, m in short)
        raise ValueError(
            f"n_neighbors={n_neighbors} but some cell types have fewer cells of other types to choose "
            f"neighbours from ({detail}); lower n_neighbors or merge the cell types."
        )
    nn_idx = np.empty((n, n_neighbors), dtype=np.int64)
    nn_dist = np.empty((n, n_neighbors), dtype=np.float64)
    for c in codes:
        rec = np.flatnonzero(labels == c)
        other = np.flatnonzero(labels != c)
        d, j = cKDTree(coords[other]).query(coords[rec], k=n_neighbors)
        d, j = d.reshape(len(rec), n_neighbors), j.reshape(len(rec), n_neighbors)
        nn_idx[rec] = other[j]
        nn_dist[rec] = d
    if radius is not None:
        nn_dist = np.clip(nn_dist - radius[:, None] - radius[nn_idx], 0.0, None)
        order = np.argsort(nn_dist, axis=1, kind="stable")
        nn_dist = np.take_along_axis(nn_dist, order, axis=1)
        nn_idx = np.take_along_axis(nn_idx, order, axis=1)
    return nn_idx, nn_dist.astype(np.float32)


class NeighborStore:
    """Expression, labels and neighbour tables of one AnnData as tensors; gathers minibatches by index.

    Parameters
    ----------
    X
        (n, G) expression: a numpy array or a scipy sparse matrix (kept sparse, as CSR tensors).
    labels
        (n,) or (n, 1) integer type codes.
    nn_idx
        (n, K) neighbour row indices.
    nn_dist
        (n, K) neighbour distances.
    device
        Where the tensors live.
    """

    def __init__(self, X, labels, nn_idx, nn_dist, device: str | torch.device = "cpu"):
        n = X.shape[0]
        nn_idx = np.asarray(nn_idx)
        if nn_idx.ndim != 2 or nn_idx.shape[0] != n:
            raise ValueError(f"neighbour indices must have shape (n_obs, K) = ({n}, K), got {nn_idx.shape}.")
        if nn_idx.size and (nn_idx.min() < 0 or nn_idx.max() >= n):
            raise ValueError(
                f"neighbour indices fall outside 0..{n - 1}: they were computed on another AnnData; run "
                "AMICI.setup_anndata on this AnnData again."
            )
        self.device = torch.device(device)
        self.n_obs, self.n_genes = n, X.shape[1]
        self.sparse = sp.issparse(X)
        if self.sparse:
            csr = sp.csr_matrix(X)
            self.indptr = torch.as_tensor(csr.indptr.astype(np.int64))
            self.indices = torch.as_tensor(csr.indices.astype(np.int64))
            self.data = torch.as_tensor(np.asarray(csr.data, dtype=np.float32))
            self.X = None
        else:
            self.X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        self.labels = torch.as_tensor(np.asarray(labels).reshape(-1).astype(np.int64))
        self.nn_idx = torch.as_tensor(nn_idx.astype(np.int64))
        self.nn_dist = torch.as_tensor(np.asarray(nn_dist, dtype=np.float32))
        self.to(self.device)

    def to(self, device) -> NeighborStore:
        """Move all tensors to ``device`` (in place); returns ``self``."""
        device = torch.device(device)
        for name in ("X", "indptr", "indices", "data", "labels", "nn_idx", "nn_dist"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.to(device))
        self.device = device
        return self

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense (len(idx), G) float32 expression of rows ``idx`` (densified per call when sparse)."""
        if not self.sparse:
            return self.X.index_select(0, idx)
        start, end = self.indptr[idx], self.indptr[idx + 1]
        lengths = end - start
        out = torch.zeros(len(idx), self.n_genes, dtype=torch.float32, device=self.device)
        total = int(lengths.sum())
        if total == 0:
            return out
        row = torch.repeat_interleave(torch.arange(len(idx), device=self.device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(total, device=self.device) - torch.repeat_interleave(offsets, lengths)
        pos = pos + torch.repeat_interleave(start, lengths)
        out[row, self.indices[pos]] = self.data[pos]
        return out

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Minibatch of receivers ``idx`` (B,): X, labels, neighbour distances and unique neighbour rows."""
        idx = idx.to(self.device).long()
        nn_idx = self.nn_idx[idx]
        uniq, inverse = torch.unique(nn_idx, return_inverse=True)
        return {
            KEYS.X: self.rows(idx),
            KEYS.LABELS: self.labels[idx][:, None],
            KEYS.NN_IDX: nn_idx,
            KEYS.NN_DIST: self.nn_dist[idx],
            KEYS.NN_X_UNIQUE: self.rows(uniq),
            KEYS.NN_INVERSE: inverse,
            KEYS.INDICES: idx,
        }

    def type_means(self, idx: np.ndarray | None, n_labels: int, chunk: int = 4096) -> torch.Tensor:
        """(n_labels, G) mean expression per type over rows ``idx`` (all rows if None); 0 for absent types."""
        idx = torch.arange(self.n_obs) if idx is None else torch.as_tensor(np.asarray(idx), dtype=torch.long)
        sums = torch.zeros(n_labels, self.n_genes, dtype=torch.float64, device=self.device)
        counts = torch.zeros(n_labels, dtype=torch.float64, device=self.device)
        for s in range(0, len(idx), chunk):
            part = idx[s : s + chunk].to(self.device)
            lab = self.labels[part]
            sums.index_add_(0, lab, self.rows(part).double())
            counts.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
        return (sums / counts.clamp(min=1)[:, None]).float().cpu()


class NeighborBatches:
    """Iterate gathered minibatches of ``indices`` in order (for inference)."""

    def __init__(self, store: NeighborStore, indices=None, batch_size: int = 128):
        self.store = store
        self.indices = np.arange(store.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch_size):
            yield self.store.batch(torch.as_tensor(self.indices[s : s + self.batch_size]))


def morton_code(coords: np.ndarray) -> np.ndarray:
    """Morton (Z-order) code of the first two coordinates of each row, 16 bits each (vectorised, uint64)."""
    xy = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)[:, :2]
    if xy.shape[1] == 1:
        xy = np.concatenate([xy, np.zeros_like(xy)], axis=1)
    lo = xy.min(0) if len(xy) else np.zeros(2)
    span = np.ptp(xy, axis=0) if len(xy) else np.ones(2)
    q = ((xy - lo) / np.where(span > 0, span, 1.0) * 65535).astype(np.uint64)

    def spread(v):
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    return spread(q[:, 0]) | (spread(q[:, 1]) << np.uint64(1))


def morton_order(coords: np.ndarray) -> np.ndarray:
    """Row order (int64 permutation) of ``coords`` (n, d) along a Z-order curve of the first two coordinates.

    Consecutive rows of the order are spatially close, so minibatches of consecutive cells share most of
    their spatial neighbours. Ties keep their original order.

    Examples
    --------
    >>> import numpy as np
    >>> from cellvi.amici._data import morton_order
    >>> morton_order(np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])).tolist()
    [1, 2, 3, 0]
    """
    return np.argsort(morton_code(coords), kind="stable").astype(np.int64)


class SpatialPatchSampler:
    """Minibatches of spatially compact patches of cells, for one process or one rank of several.

    Each epoch the cells (positions ``0..n-1`` with coordinates ``coords``) are cut, along their
    :func:`morton_order` shifted by a random offset, into patches of ``patch_size`` consecutive cells; the
    patches are shuffled and concatenated, and consecutive runs of ``batch_size * num_replicas`` positions
    form the global minibatches. Every cell is visited once per epoch, in a minibatch of ``batch_size /
    patch_size`` patches from random places of the tissue. ``patch_size=1`` gives plain shuffled
    minibatches. Without ``shuffle`` the order is the Morton order (validation).

    Seeding follows :class:`cellvi.dataloaders.MinibatchSampler`: in one process without ``seed`` each epoch
    draws its seed from torch's global generator (``scvi.settings.seed`` fixes the order); with
    ``num_replicas > 1`` or a ``seed`` the order depends only on ``seed + epoch`` (:meth:`set_epoch`), is
    padded by repeating its first positions to a multiple of ``num_replicas``, and rank ``r`` takes the
    ``r``-th contiguous ``1 / num_replicas`` of every global minibatch (whole patches). The union of the
    ranks' minibatch ``k`` is minibatch ``k`` of one process with ``batch_size * num_replicas`` and the same
    seed.

    Parameters
    ----------
    coords
        (n, d) coordinates of the cells to sample.
    batch_size
        Minibatch size (per rank).
    shuffle
        Shuffle the patches each epoch.
    drop_last
        Drop the last incomplete (global) minibatch.
    patch_size
        Cells per spatial patch (``1``: no patches).
    num_replicas, rank
        Number of processes and this process's rank.
    seed
        Seed of the distributed/seeded mode (``None``: 0 when ``num_replicas > 1``).
    device
        Device of the returned position tensors.
    """

    def __init__(
        self,
        coords: np.ndarray,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        patch_size: int = 16,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.n = len(coords)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.patch_size = check_positive_int(patch_size, "patch_size")
        self.num_replicas = check_positive_int(num_replicas, "num_replicas")
        if not 0 <= int(rank) < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}); got {rank}.")
        self.rank = int(rank)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.distributed = self.num_replicas > 1 or seed is not None
        self.seed = 0 if seed is None else int(seed)
        self.epoch = 0
        self.device = torch.device(device)
        self.base = torch.as_tensor(morton_order(coords) if self.n else np.zeros(0, np.int64))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (the order of the distributed/seeded mode is a function of seed + epoch)."""
        self.epoch = int(epoch)

    def _global_order(self) -> torch.Tensor:
        if not self.shuffle or self.n == 0:
            return self.base
        seed = (
            self.seed + self.epoch
            if self.distributed
            else int(torch.empty((), dtype=torch.int64).random_().item())
        )
        gen = torch.Generator().manual_seed(seed)
        ps = min(self.patch_size, self.n)
        if ps == 1:
            return self.base[torch.randperm(self.n, generator=gen)]
        offset = int(torch.randint(ps, (), generator=gen))
        rolled = torch.roll(self.base, -offset)
        n_patches = -(-self.n // ps)
        padded = torch.cat([rolled, rolled.new_full((n_patches * ps - self.n,), -1)]).view(n_patches, ps)
        flat = padded[torch.randperm(n_patches, generator=gen)].reshape(-1)
        return flat[flat >= 0]

    def _global_sizes(self) -> tuple[int, list[int]]:
        total = -(-self.n // self.num_replicas) * self.num_replicas if self.distributed else self.n
        gb = self.batch_size * self.num_replicas
        sizes = [gb] * (total // gb)
        if total % gb and not self.drop_last:
            sizes.append(total % gb)
        return total, sizes

    def __len__(self) -> int:
        return len(self._global_sizes()[1])

    def __iter__(self):
        order = self._global_order()
        total, sizes = self._global_sizes()
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        order = order.to(self.device)
        start, R, r = 0, self.num_replicas, self.rank
        for size in sizes:
            share = size // R
            yield order[start + r * share : start + (r + 1) * share]
            start += size


class NeighborLoader(DeviceDataLoader):
    """:class:`~cellvi.dataloaders.DeviceDataLoader` of receivers that also gathers their neighbours.

    Each minibatch holds the receivers' registered fields (expression, labels, neighbour indices and
    distances), ``nn_x_unique`` (U, G), the expression of the minibatch's U unique neighbour cells,
    ``nn_inverse`` (B, K), the row of ``nn_x_unique`` of each (receiver, neighbour) slot, and ``_indices``,
    the receivers' rows. Minibatches come from :class:`SpatialPatchSampler`.

    Parameters
    ----------
    adata_manager, indices, batch_size, shuffle, drop_last
        As :class:`~cellvi.dataloaders.DeviceDataLoader`.
    coords
        (n_obs, d) coordinates of all cells of the AnnData (patches of the sampler).
    patch_size
        Cells per spatial patch of the sampler.
    distributed_sampler, num_replicas, rank, seed
        Each rank's share of every minibatch (see :class:`SpatialPatchSampler`).
    **kwargs
        Other keyword arguments of :class:`~cellvi.dataloaders.DeviceDataLoader` (``store``, ``device``,
        ``data_and_attributes`` ...).
    """

    def __init__(
        self,
        adata_manager,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        *,
        coords: np.ndarray,
        patch_size: int = 1,
        distributed_sampler: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.pop("drop_dataset_tail", None)
        idx = np.arange(adata_manager.adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        if distributed_sampler and (num_replicas is None or rank is None):
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("distributed_sampler=True needs torch.distributed or num_replicas and rank.")
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        sampler = SpatialPatchSampler(
            np.asarray(coords)[idx],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            patch_size=patch_size,
            num_replicas=num_replicas or 1,
            rank=rank or 0,
            seed=seed,
        )
        super().__init__(
            adata_manager, indices=idx, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
            drop_last=drop_last, **kwargs,
        )  # fmt: skip

    def augment(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add the unique neighbours' expression, the inverse index and the receivers' rows."""
        nn_idx = batch[KEYS.NN_IDX].to(self.store.device)
        uniq, inverse = torch.unique(nn_idx, return_inverse=True)
        batch[KEYS.NN_X_UNIQUE] = self.store.rows(KEYS.X, uniq).to(self.device)
        batch[KEYS.NN_INVERSE] = inverse.to(self.device)
        batch[KEYS.INDICES] = rows.to(self.device)
        return batch


#: registered fields a training minibatch needs, with their dtypes (neighbour indices stay int64)
TRAIN_FIELDS = {KEYS.X: np.float32, KEYS.LABELS: np.int64, KEYS.NN_IDX: np.int64, KEYS.NN_DIST: np.float32}


class SpatialDataSplitter(DataSplitter):
    """Train / validation / test split of :class:`cellvi.AMICI` on the shared in-memory data path.

    :class:`cellvi.dataloaders.DataSplitter` (scvi's split, ``data_path``, DDP shares) with
    :class:`NeighborLoader`: minibatches of spatial patches (``patch_size``) and the unique neighbours'
    expression gathered from the same store. Only ``data_path`` ``"auto"``, ``"device"`` and ``"stream"``
    apply: each step reads arbitrary neighbour rows of the whole expression matrix.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    patch_size
        Cells per spatial patch of the training minibatches (default ``1``: plain shuffled minibatches).
    data_path
        ``"auto"``, ``"device"`` or ``"stream"`` (see :class:`cellvi.dataloaders.DataSplitter`).
    **kwargs
        Other arguments of :class:`cellvi.dataloaders.DataSplitter` (``train_size``, ``batch_size`` ...).
    """

    device_loader_cls = NeighborLoader

    def __init__(self, adata_manager, patch_size: int = 1, data_path: str = "auto", **kwargs):
        if data_path not in ("auto", "device", "stream"):
            raise ValueError(
                f"data_path must be 'auto', 'device' or 'stream' for AMICI, got {data_path!r}: every step "
                "gathers neighbour rows from the whole in-memory expression matrix."
            )
        kwargs.setdefault("data_and_attributes", dict(TRAIN_FIELDS))
        kwargs["coords"] = np.asarray(adata_manager.get_from_registry(KEYS.COORDS), dtype=np.float64)
        kwargs["patch_size"] = check_positive_int(patch_size, "patch_size")
        super().__init__(adata_manager, data_path=data_path, **kwargs)

    def _prepare_data_path(self) -> None:
        super()._prepare_data_path()
        if self.resolved_data_path not in ("device", "stream"):
            raise ValueError(
                "AMICI trains on in-memory data only (each step gathers neighbour rows of the whole matrix); "
                "load the AnnData into memory (adata.to_memory())."
            )
