"""Neighbour tables and the fast neighbour data path of :class:`cellvi.AMICI`.

* :func:`other_type_neighbors` computes, for every cell, its ``K`` nearest cells of another type (one
  KD-tree per cell type, no loop over cells).
* :class:`NeighborStore` keeps the expression (dense, or CSR parts when sparse), labels and neighbour
  tables of one AnnData as tensors on one device and gathers a minibatch by index: the receivers'
  rows, and the rows of the *unique* neighbour cells with an inverse index, so per-neighbour features
  are computed once per cell. Sparse expression is densified one minibatch at a time.
* :class:`IndexLoader` yields minibatches of receiver indices; :class:`NeighborBatches` yields gathered
  minibatches (used for inference); :class:`SpatialDataSplitter` is scvi's :class:`~scvi.dataloaders.DataSplitter`
  with the index loader (its own subclass: no scvi class is patched) and gathers on the device in
  ``on_after_batch_transfer``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse as sp
from scipy.spatial import cKDTree
from scvi.dataloaders import DataSplitter

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


class IndexLoader(torch.utils.data.DataLoader):
    """Minibatches of receiver row indices, as ``{"_indices": LongTensor (B,)}``.

    Accepts (and ignores) the keyword arguments that :class:`~scvi.dataloaders.DataSplitter` passes to
    its loader class and that concern AnnData tensors.
    """

    def __init__(
        self,
        adata_manager=None,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        load_sparse_tensor: bool = False,
        pin_memory: bool = False,
        **kwargs,
    ):
        for key in ("data_and_attributes", "iter_ndarray", "distributed_sampler", "persistent_workers"):
            kwargs.pop(key, None)
        kwargs.pop("num_workers", None)
        self.indices = np.asarray(indices, dtype=np.int64)
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(self.indices) if shuffle else torch.utils.data.SequentialSampler(self.indices),
            batch_size=batch_size,
            drop_last=drop_last,
        )
        super().__init__(self.indices, sampler=sampler, batch_size=None, collate_fn=self._collate, **kwargs)

    @staticmethod
    def _collate(rows):
        # the sampler yields positions; the fetcher has already indexed ``self.indices`` with them
        return {KEYS.INDICES: torch.as_tensor(np.asarray(rows, dtype=np.int64))}


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


class SpatialDataSplitter(DataSplitter):
    """scvi's train/validation/test splitter with the index loader; gathers neighbours on the device."""

    data_loader_cls = IndexLoader

    def __init__(self, adata_manager, store: NeighborStore, **kwargs):
        super().__init__(adata_manager, **kwargs)
        self.store = store

    def on_after_batch_transfer(self, batch, dataloader_idx):
        idx = batch[KEYS.INDICES]
        if self.store.device != idx.device:
            self.store.to(idx.device)
        return self.store.batch(idx)
