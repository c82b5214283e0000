"""Registered AnnData arrays held as torch tensors on one device, gathered a minibatch at a time.

A :class:`TensorStore` reads every registered field once. Dense arrays become ``(n_obs, d)``
tensors; sparse matrices stay sparse as three CSR tensors (row pointers, column indices, values).
A minibatch is gathered in two steps, both array operations on the store's device:

1. :meth:`TensorStore.take` selects the rows (for CSR: only their non-zeros, still compressed);
2. :meth:`TensorStore.densify` moves that compact minibatch to the training device (pinned,
   non-blocking when it comes from the CPU) and scatters the non-zeros into a dense block.

Only the minibatch is ever dense. On the CPU, float32 CSR and dense float32 arrays are shared
with the AnnData object (no copy); other dtypes are cast once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data._utils import registry_key_to_default_dtype


class UnsupportedStorage(TypeError):
    """A registered field cannot be held in memory as tensors (backed, h5py, dask ...)."""


@dataclass
class _CSR:
    """A sparse field: torch CSR arrays on an accelerator, a scipy CSR matrix on the CPU."""

    n_cols: int
    indptr: torch.Tensor | None = None  # (n_obs + 1,) int64
    indices: torch.Tensor | None = None  # (nnz,) int32 or int64
    data: torch.Tensor | None = None  # (nnz,) target dtype
    matrix: sparse.csr_matrix | None = None  # CPU: scipy's compiled row gather is the fastest

    @property
    def nbytes(self) -> int:
        if self.matrix is not None:
            m = self.matrix
            return m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        return sum(t.numel() * t.element_size() for t in (self.indptr, self.indices, self.data))


@dataclass
class _CSRRows:
    """Rows of a sparse field, still compressed."""

    crow: torch.Tensor  # (n_rows + 1,) row pointers
    cols: torch.Tensor  # (nnz,)
    vals: torch.Tensor  # (nnz,)
    n_cols: int
    row_of: torch.Tensor | None = None  # (nnz,) row of each value, when already computed
    matrix: sparse.csr_matrix | None = None  # the same rows as scipy CSR (CPU store)


@dataclass
class PackedBatch:
    """Rows of a minibatch, sparse fields still compressed (see :meth:`TensorStore.take`)."""

    dense: dict[str, torch.Tensor]
    csr: dict[str, _CSRRows]
    n_rows: int


def keys_and_dtypes(adata_manager, data_and_attributes=None) -> dict[str, np.dtype]:
    """Registry keys to load and their numpy dtype, with the semantics of scvi's ``AnnTorchDataset``."""
    registered = list(adata_manager.data_registry.keys())
    if data_and_attributes is None:
        out = {key: registry_key_to_default_dtype(key) for key in registered}
    elif isinstance(data_and_attributes, list):
        out = {key: registry_key_to_default_dtype(key) for key in data_and_attributes}
    elif isinstance(data_and_attributes, dict):
        out = dict(data_and_attributes)
    else:
        raise ValueError(
            "data_and_attributes must be a list of registry keys, a dict {key: dtype} or None; "
            f"got {type(data_and_attributes).__name__}."
        )
    missing = [key for key in out if key not in registered]
    if missing:
        raise ValueError(
            f"data_and_attributes names {missing}, which are not registered; registered keys: {registered}."
        )
    # the minified-data marker is a string in .uns, never a tensor (as in scvi)
    out.pop(REGISTRY_KEYS.MINIFY_TYPE_KEY, None)
    return {key: np.dtype(dtype) for key, dtype in out.items()}


def _is_in_memory(data) -> bool:
    return isinstance(data, np.ndarray | pd.DataFrame) or sparse.issparse(data)


def registered_in_memory(adata_manager, data_and_attributes=None) -> bool:
    """Whether every registered field to load is an in-memory array (not backed / h5py / dask)."""
    if getattr(adata_manager.adata, "isbacked", False):
        return False
    return all(
        _is_in_memory(adata_manager.get_from_registry(key))
        for key in keys_and_dtypes(adata_manager, data_and_attributes)
    )


def estimate_nbytes(adata_manager, data_and_attributes=None) -> int:
    """Bytes the registered fields take as tensors (CSR for sparse ones), without building them."""
    total = 0
    for key, dtype in keys_and_dtypes(adata_manager, data_and_attributes).items():
        data = adata_manager.get_from_registry(key)
        if sparse.issparse(data):
            index_bytes = 4 if data.shape[1] < 2**31 else 8
            total += data.nnz * (dtype.itemsize + index_bytes) + (data.shape[0] + 1) * 8
        else:
            shape = data.shape
            total += int(np.prod(shape)) * dtype.itemsize if len(shape) else 0
    return total


def _as_tensor(array: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    """Tensor view of ``array`` cast to ``dtype`` on ``device`` (no copy on the CPU when possible)."""
    array = np.asarray(array)
    if array.dtype != dtype:
        array = array.astype(dtype)
    if not array.flags.writeable or not array.flags.c_contiguous:
        # torch cannot share read-only or strided memory; this copies once
        array = np.ascontiguousarray(array).copy()
    return torch.from_numpy(array).to(device)


class TensorStore:
    """Registered fields of an AnnData object as tensors on one device.

    Parameters
    ----------
    adata_manager
        :class:`~scvi.data.AnnDataManager` object with a registered AnnData object.
    data_and_attributes
        Registry keys to load (list) or keys and numpy dtypes (dict). ``None`` loads all
        registered fields with scvi's default dtypes (float32, int64 for categorical fields).
    device
        Where the arrays live. ``"cpu"`` shares float32 memory with the AnnData object.
    sparse_backend
        How sparse rows are gathered: ``"scipy"`` (scipy's compiled CSR row gather, the fastest
        on the CPU) or ``"torch"`` (CSR tensors and array operations on ``device``, the only
        choice on an accelerator). Default: ``"scipy"`` on the CPU, ``"torch"`` elsewhere.

    Raises
    ------
    UnsupportedStorage
        If a field is not an in-memory numpy array, data frame or scipy sparse matrix.
    """

    def __init__(
        self,
        adata_manager,
        data_and_attributes=None,
        device: torch.device | str = "cpu",
        sparse_backend: str | None = None,
    ):
        self.device = torch.device(device)
        if sparse_backend is None:
            sparse_backend = "scipy" if self.device.type == "cpu" else "torch"
        if sparse_backend not in ("scipy", "torch"):
            raise ValueError(f"sparse_backend must be 'scipy' or 'torch'; got {sparse_backend!r}.")
        if sparse_backend == "scipy" and self.device.type != "cpu":
            raise ValueError(f"sparse_backend='scipy' needs device='cpu'; got {self.device}.")
        self.sparse_backend = sparse_backend
        self.keys_and_dtypes = keys_and_dtypes(adata_manager, data_and_attributes)
        self.n_obs = adata_manager.adata.n_obs
        self._dense: dict[str, torch.Tensor] = {}
        self._csr: dict[str, _CSR] = {}
        for key, dtype in self.keys_and_dtypes.items():
            data = adata_manager.get_from_registry(key)
            if isinstance(data, pd.DataFrame):
                data = data.to_numpy()
            if isinstance(data, np.ndarray):
                if data.ndim == 1:
                    data = data[:, None]
                self._dense[key] = _as_tensor(data, dtype, self.device)
            elif sparse.issparse(data):
                self._csr[key] = self._to_csr(data, dtype)
            else:
                raise UnsupportedStorage(
                    f"Registered field {key!r} is a {type(data).__name__}; the in-memory data path "
                    "needs numpy arrays, data frames or scipy sparse matrices (use data_path='scvi' "
                    "for backed or dask data)."
                )

    def _to_csr(self, matrix, dtype: np.dtype) -> _CSR:
        csr = matrix.tocsr() if matrix.format != "csr" else matrix
        if not csr.has_canonical_format:
            # scipy's toarray sums duplicate entries; make them one entry each (sparse copy)
            csr = csr.copy()
            csr.sum_duplicates()
        if self.sparse_backend == "scipy":
            # shares the AnnData object's arrays when the dtype matches
            return _CSR(n_cols=csr.shape[1], matrix=csr if csr.dtype == dtype else csr.astype(dtype))
        index_dtype = np.int32 if csr.shape[1] < 2**31 else np.int64
        return _CSR(
            n_cols=csr.shape[1],
            indptr=_as_tensor(csr.indptr, np.dtype(np.int64), self.device),
            indices=_as_tensor(csr.indices, np.dtype(index_dtype), self.device),
            data=_as_tensor(csr.data, dtype, self.device),
        )

    @property
    def keys(self) -> list[str]:
        """Registry keys held by the store."""
        return list(self.keys_and_dtypes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the store's tensors."""
        total = sum(t.numel() * t.element_size() for t in self._dense.values())
        return total + sum(c.nbytes for c in self._csr.values())

    def take(
        self,
        rows: torch.Tensor,
        nnz: dict[str, int] | None = None,
        keys: list[str] | None = None,
    ) -> PackedBatch:
        """Select ``rows`` (int64 tensor on the store's device); sparse fields stay compressed.

        ``nnz`` gives the number of stored values of the rows per sparse field when known (see
        :meth:`batch_nnz`); it spares a device synchronisation per minibatch. ``keys`` restricts
        the fields (default: all).
        """
        keys = self.keys if keys is None else keys
        nnz = nnz or {}
        dense = {key: torch.index_select(self._dense[key], 0, rows) for key in keys if key in self._dense}
        csr = {key: self._take_csr(self._csr[key], rows, nnz.get(key)) for key in keys if key in self._csr}
        return PackedBatch(dense=dense, csr=csr, n_rows=int(rows.shape[0]))

    def batch_nnz(self, rows: torch.Tensor, sizes: list[int]) -> dict[str, list[int]]:
        """Stored values per sparse field for consecutive minibatches of ``rows`` of the given sizes.

        One device synchronisation per field for a whole epoch instead of one per minibatch.
        """
        out = {}
        if self.device.type == "cpu":
            return out  # nothing to synchronise on the CPU
        ends = torch.as_tensor(np.cumsum(sizes), dtype=torch.int64, device=rows.device)
        for key, c in self._csr.items():
            counts = torch.index_select(c.indptr, 0, rows + 1) - torch.index_select(c.indptr, 0, rows)
            cum = torch.cumsum(counts, 0)
            at_end = cum[ends - 1] if len(sizes) else cum[:0]
            out[key] = torch.diff(at_end, prepend=at_end.new_zeros(1)).tolist()
        return out

    @staticmethod
    def _take_csr(c: _CSR, rows: torch.Tensor, nnz: int | None = None) -> _CSRRows:
        if c.matrix is not None:
            sub = c.matrix[rows.numpy()]
            return _CSRRows(
                crow=torch.from_numpy(sub.indptr),
                cols=torch.from_numpy(sub.indices),
                vals=torch.from_numpy(sub.data),
                n_cols=c.n_cols,
                matrix=sub,
            )
        # (index_select rather than advanced indexing: several times faster)
        start = torch.index_select(c.indptr, 0, rows)
        counts = torch.index_select(c.indptr, 0, rows + 1) - start
        crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(counts, 0, out=crow[1:])
        if nnz is None:
            nnz = int(crow[-1])
        row_of = torch.repeat_interleave(
            torch.arange(rows.shape[0], device=rows.device), counts, output_size=nnz
        )
        # position of each kept non-zero in the full arrays
        pos = torch.arange(nnz, device=rows.device) + torch.index_select(start - crow[:-1], 0, row_of)
        cols = torch.index_select(c.indices, 0, pos)
        vals = torch.index_select(c.data, 0, pos)
        return _CSRRows(crow=crow, cols=cols, vals=vals, n_cols=c.n_cols, row_of=row_of)

    def densify(self, packed: PackedBatch, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Move a :class:`PackedBatch` to ``device`` and expand its sparse fields to dense blocks."""
        device = self.device if device is None else torch.device(device)
        moving = device != self.device
        pin = moving and self.device.type == "cpu" and device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if not moving:
                return t
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=pin)

        out = {key: move(t) for key, t in packed.dense.items()}
        for key, part in packed.csr.items():
            n_rows = part.crow.shape[0] - 1
            if not moving and part.matrix is not None:
                out[key] = torch.from_numpy(part.matrix.toarray())
                continue
            row_of, cols, vals = part.row_of, part.cols, part.vals
            if moving or row_of is None:
                # only the compact arrays travel; the row of each value is rebuilt on the device
                crow, cols, vals = move(part.crow.long()), move(cols), move(vals)
                row_of = torch.repeat_interleave(
                    torch.arange(n_rows, device=device), crow.diff(), output_size=cols.shape[0]
                )
            flat = row_of * part.n_cols + cols
            block = torch.zeros(n_rows * part.n_cols, dtype=vals.dtype, device=device)
            # canonical CSR: each (row, column) once, so a copy is a scatter
            block.index_copy_(0, flat, vals)
            out[key] = block.view(n_rows, part.n_cols)
        # the order of keys follows the registry, as in scvi's loader
        return {key: out[key] for key in self.keys_and_dtypes if key in out}

    def gather(
        self,
        rows: torch.Tensor,
        device: torch.device | None = None,
        nnz: dict[str, int] | None = None,
        keys: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Dense minibatch dict for ``rows``: :meth:`take` then :meth:`densify`."""
        return self.densify(self.take(rows, nnz, keys), device)

    def rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Dense rows of one field, for any index tensor shape (e.g. neighbours ``(B, K)``).

        Returns a tensor of shape ``(*rows.shape, d)`` on the store's device. Useful for models
        that gather more than the minibatch rows (neighbour expression in spatial models).
        """
        flat = rows.reshape(-1).to(self.device, torch.int64)
        if key in self._dense:
            values = torch.index_select(self._dense[key], 0, flat)
        elif key in self._csr:
            packed = PackedBatch({}, {key: self._take_csr(self._csr[key], flat)}, flat.shape[0])
            values = self.densify(packed)[key]
        else:
            raise ValueError(f"key {key!r} is not held by this store; it holds {self.keys}.")
        return values.reshape(*rows.shape, values.shape[-1])
