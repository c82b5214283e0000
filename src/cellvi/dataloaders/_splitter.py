"""Data splitters that train from a device-resident copy of the registered data.

Subclasses of scvi-tools' splitters: the split into train / validation / test sets is scvi's own
code (``train_size``, ``validation_size``, ``shuffle_set_split``, ``external_indexing``, the move
of a tiny last minibatch to the validation set), only the loaders differ.
"""

from __future__ import annotations

import logging

import torch
from scvi.dataloaders import DataSplitter as _ScviDataSplitter
from scvi.dataloaders import SemiSupervisedDataSplitter as _ScviSemiSupervisedDataSplitter

from ._backed import BackedDataLoader, backed_supported
from ._loader import DeviceDataLoader
from ._semi import SemiSupervisedDeviceDataLoader
from ._store import TensorStore, estimate_nbytes, registered_in_memory

logger = logging.getLogger(__name__)

DATA_PATHS = ("auto", "device", "stream", "backed", "scvi")

#: ``data_path="auto"`` puts the data on an accelerator when they take at most this fraction of its
#: free memory (the rest is left to the model's parameters, activations and optimiser state).
DEVICE_MEMORY_FRACTION = 0.5


def check_data_path(data_path: str) -> str:
    """Return ``data_path`` or raise a ValueError naming the accepted values."""
    if data_path not in DATA_PATHS:
        raise ValueError(f"data_path must be one of {DATA_PATHS}; got {data_path!r}.")
    return data_path


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator, or ``None`` when unknown (the CPU, other backends)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):  # older torch
            return None
    return None


def resolve_data_path(
    data_path: str,
    adata_manager,
    device: torch.device | str = "cpu",
    data_and_attributes=None,
) -> str:
    """The data path a splitter uses: ``"device"``, ``"stream"``, ``"backed"`` or ``"scvi"``.

    The rule for ``"auto"``:

    1. registered data that are not all in memory: ``"backed"`` (contiguous chunks read from
       disk, see :class:`BackedDataLoader`) when the on-disk matrices are HDF5/zarr dense or CSR
       arrays of a backed AnnData, else ``"scvi"`` (dask arrays, CSC on disk);
    2. on the CPU, ``"device"``: the arrays are shared with the AnnData object (float32 data are
       not copied) and minibatches are gathered without scvi's per-minibatch dataset and
       ``DataLoader`` machinery, which is as fast or faster (``benchmarks/dataloading.py``);
    3. on CUDA or MPS, ``"device"`` when the registered arrays (CSR for sparse ones) take at most
       :data:`DEVICE_MEMORY_FRACTION` of the free device memory, otherwise ``"stream"`` (arrays on
       the CPU, each compact minibatch copied through pinned memory and made dense on the
       device);
    4. any other accelerator uses ``"scvi"``.

    An explicit ``"device"`` or ``"stream"`` raises a ValueError when the data are not in memory,
    and an explicit ``"backed"`` when they are not on disk in a supported format.
    """
    check_data_path(data_path)
    if data_path == "scvi":
        return "scvi"
    in_memory = registered_in_memory(adata_manager, data_and_attributes)
    if data_path in ("device", "stream"):
        if not in_memory:
            raise ValueError(
                f"data_path={data_path!r} needs the registered data in memory; this AnnData is backed "
                "or holds on-disk / dask arrays. Use data_path='backed', 'scvi' or 'auto'."
            )
        return data_path
    if data_path == "backed":
        if not backed_supported(adata_manager, data_and_attributes):
            raise ValueError(
                "data_path='backed' needs registered arrays in memory or on disk as dense or CSR "
                "arrays of a backed AnnData (not CSC, not dask). Use data_path='scvi'."
            )
        return "backed"
    if not in_memory:
        return "backed" if backed_supported(adata_manager, data_and_attributes) else "scvi"
    device = torch.device(device)
    if device.type == "cpu":
        return "device"
    free = free_device_memory(device)
    if free is None:
        return "scvi"
    needed = estimate_nbytes(adata_manager, data_and_attributes)
    return "device" if needed <= DEVICE_MEMORY_FRACTION * free else "stream"


class _DevicePathMixin:
    """Shared by both splitters: resolve the data path at ``setup`` and build the store once."""

    _supports_backed = True

    def _init_data_path(self, data_path: str, device) -> None:
        self.data_path = check_data_path(data_path)
        self._device_arg = None if device is None else torch.device(device)
        self.resolved_data_path: str | None = None
        self.device: torch.device | None = None
        self._store: TensorStore | None = None
        self._store_key = None

    def _training_device(self) -> torch.device:
        if self._device_arg is not None:
            return self._device_arg
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cpu")

    def _replica_kwargs(self) -> dict:
        """World size and rank from the trainer when the loaders are distributed."""
        if not self.data_loader_kwargs.get("distributed_sampler", False):
            return {}
        trainer = getattr(self, "trainer", None)
        if trainer is None or "num_replicas" in self.data_loader_kwargs:
            return {}
        return {"num_replicas": trainer.world_size, "rank": trainer.global_rank}

    def _prepare_data_path(self) -> None:
        device = self._training_device()
        data_and_attributes = self.data_loader_kwargs.get("data_and_attributes")
        path = resolve_data_path(self.data_path, self.adata_manager, device, data_and_attributes)
        if path == "backed" and not (self._supports_backed and self.device_loader_cls is DeviceDataLoader):
            # (a custom loader adds fields the chunked reader does not know about)
            path = "scvi"
        self.resolved_data_path, self.device = path, device
        if path in ("scvi", "backed"):
            self._store = None
            return
        store_device = torch.device("cpu") if path == "stream" else device
        key = (store_device, repr(data_and_attributes))
        if self._store is None or self._store_key != key:
            self._store = TensorStore(self.adata_manager, data_and_attributes, device=store_device)
            self._store_key = key
        logger.info(
            "cellvi data path %r: %.1f MB of registered data on %s, minibatches on %s",
            path,
            self._store.nbytes / 1e6,
            store_device,
            device,
        )

    def _device_loader_kwargs(self) -> dict:
        kwargs = dict(self.data_loader_kwargs)
        kwargs.update(self._replica_kwargs())
        kwargs["device"] = self.device
        if self.resolved_data_path != "backed":
            kwargs["store"] = self._store
        return kwargs


class DataSplitter(_DevicePathMixin, _ScviDataSplitter):
    """Creates data loaders ``train_set``, ``validation_set``, ``test_set`` on the fast data path.

    A drop-in for :class:`scvi.dataloaders.DataSplitter` (same split, same arguments) whose
    loaders are :class:`DeviceDataLoader` objects reading one shared :class:`TensorStore`: the
    registered arrays are placed on the training device once (sparse stays CSR), minibatch
    indices are drawn there, and only minibatch rows are made dense. The training device is the
    Lightning trainer's (each DDP rank uses its own device and its share of the minibatches).

    If ``train_size + validation_set < 1``, then ``test_set`` is non-empty.

    Parameters
    ----------
    adata_manager
        :class:`~scvi.data.AnnDataManager` object that has been created via ``setup_anndata``.
    train_size
        float, or None (default is None, which is practically 0.9 and potentially
        adding a small last batch to validation cells)
    validation_size
        float, or None (default is None)
    shuffle_set_split
        Whether to shuffle indices before splitting. If ``False``, the val, train, and test set
        are split in the sequential order of the data according to ``validation_size`` and
        ``train_size`` percentages.
    load_sparse_tensor
        Used by the ``"scvi"`` path only (see :class:`scvi.dataloaders.DataSplitter`); the other
        paths always keep sparse data sparse until the minibatch.
    pin_memory
        Used by the ``"scvi"`` path only; ``"stream"`` always copies through pinned memory.
    external_indexing
        A list of data split indices in the order of training, validation, and test sets.
        Validation and test set are not required and can be left empty.
    data_path
        ``"auto"`` (default), ``"device"`` (arrays on the training device), ``"stream"`` (arrays
        on the CPU, compact minibatches copied to the device) or ``"scvi"`` (scvi-tools'
        ``AnnDataLoader``). See :func:`resolve_data_path` for the rule of ``"auto"``.
    device
        Training device to place the data on; default: the Lightning trainer's device (or the
        CPU when the splitter is used without a trainer).
    **kwargs
        Keyword args for the data loaders (``batch_size``, ``drop_last``,
        ``distributed_sampler``, ``data_and_attributes``, ``seed`` ...), see
        :class:`DeviceDataLoader`.

    Examples
    --------
    >>> import scvi
    >>> from cellvi.data import simulate_ambient
    >>> from cellvi.dataloaders import DataSplitter
    >>> adata, _ = simulate_ambient(n_cells=300, n_genes=50, n_empty=100, n_damaged=0)
    >>> scvi.model.SCVI.setup_anndata(adata)
    >>> splitter = DataSplitter(scvi.model.SCVI(adata).adata_manager, batch_size=64)
    >>> splitter.setup()
    >>> splitter.resolved_data_path, len(splitter.train_idx), len(splitter.val_idx)
    ('device', 270, 30)
    """

    def __init__(
        self,
        adata_manager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        pin_memory: bool = False,
        external_indexing=None,
        data_path: str = "auto",
        device: torch.device | str | None = None,
        **kwargs,
    ):
        self._init_data_path(data_path, device)
        super().__init__(
            adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            load_sparse_tensor=load_sparse_tensor,
            pin_memory=pin_memory,
            external_indexing=external_indexing,
            **kwargs,
        )

    def setup(self, stage: str | None = None):
        """Split indices in train/test/val sets and place the data for the chosen path."""
        super().setup(stage)
        self._prepare_data_path()

    #: loader class of the in-memory paths; a model that adds fields to each minibatch (see
    #: :meth:`DeviceDataLoader.augment`) subclasses the splitter and sets its own
    device_loader_cls = DeviceDataLoader

    def _loader(self, indices, shuffle: bool, drop_last: bool):
        cls = BackedDataLoader if self.resolved_data_path == "backed" else self.device_loader_cls
        return cls(
            self.adata_manager,
            indices=indices,
            shuffle=shuffle,
            drop_last=drop_last,
            load_sparse_tensor=self.load_sparse_tensor,
            **self._device_loader_kwargs(),
        )

    def train_dataloader(self):
        """Create a train data loader."""
        if self.resolved_data_path == "scvi":
            return super().train_dataloader()
        return self._loader(self.train_idx, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self):
        """Create validation data loader."""
        if self.resolved_data_path == "scvi":
            return super().val_dataloader()
        if len(self.val_idx) > 0:
            return self._loader(self.val_idx, shuffle=False, drop_last=False)
        return None

    def test_dataloader(self):
        """Create a test data loader."""
        if self.resolved_data_path == "scvi":
            return super().test_dataloader()
        if len(self.test_idx) > 0:
            return self._loader(self.test_idx, shuffle=False, drop_last=False)
        return None


class SemiSupervisedDataSplitter(_DevicePathMixin, _ScviSemiSupervisedDataSplitter):
    """Semi-supervised data loaders ``train_set``, ``validation_set``, ``test_set`` on the fast path.

    A drop-in for :class:`scvi.dataloaders.SemiSupervisedDataSplitter`: the ratio between
    labelled and unlabelled data in adata is preserved in the train/test/val sets (scvi's own
    split), and with labelled cells each step yields a ``(full, labelled)`` pair of minibatches
    from :class:`SemiSupervisedDeviceDataLoader`; both read one shared :class:`TensorStore`.

    Parameters
    ----------
    adata_manager
        :class:`~scvi.data.AnnDataManager` object that has been created via ``setup_anndata``.
    datamodule
        Unused; accepted for scvi's signature.
    train_size
        float, or None (default is None, which is practically 0.9 and potentially
        adding a small last batch to validation cells)
    validation_size
        float, or None (default is None)
    shuffle_set_split
        Whether to shuffle indices before splitting. If ``False``, the val, train, and test set
        are split in the sequential order of the data according to ``validation_size`` and
        ``train_size`` percentages.
    n_samples_per_label
        Number of subsamples for each label class to sample per epoch
    pin_memory
        Used by the ``"scvi"`` path only.
    external_indexing
        A list of data split indices in the order of training, validation, and test sets.
        Validation and test set are not required and can be left empty.
        Note that per group (train,valid,test) it will cover both the labeled and unlebeled parts
    data_path
        ``"auto"``, ``"device"``, ``"stream"`` or ``"scvi"``, as for :class:`DataSplitter`.
    device
        Training device to place the data on; default: the Lightning trainer's.
    **kwargs
        Keyword args for the data loaders (see :class:`DeviceDataLoader`).

    Examples
    --------
    >>> import scvi
    >>> from cellvi.data import simulate_ambient
    >>> from cellvi.dataloaders import SemiSupervisedDataSplitter
    >>> adata, _ = simulate_ambient(n_cells=300, n_genes=50, n_empty=100, n_damaged=0)
    >>> scvi.model.SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category="type_0")
    >>> splitter = SemiSupervisedDataSplitter(scvi.model.SCANVI(adata).adata_manager, batch_size=64)
    >>> splitter.setup()
    >>> full, labelled = next(iter(splitter.train_dataloader()))
    >>> full["X"].shape
    torch.Size([64, 50])
    """

    # backed data: scvi's semi-supervised loader (the labelled minibatches are scattered rows)
    _supports_backed = False

    def __init__(
        self,
        adata_manager=None,
        datamodule=None,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        n_samples_per_label: int | None = None,
        pin_memory: bool = False,
        external_indexing=None,
        data_path: str = "auto",
        device: torch.device | str | None = None,
        **kwargs,
    ):
        if adata_manager is None:
            raise ValueError("adata_manager is required: the AnnDataManager of a model set up with labels.")
        self._init_data_path(data_path, device)
        super().__init__(
            adata_manager=adata_manager,
            datamodule=datamodule,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            n_samples_per_label=n_samples_per_label,
            pin_memory=pin_memory,
            external_indexing=external_indexing,
            **kwargs,
        )

    def setup(self, stage: str | None = None):
        """Split indices in train/test/val sets and place the data for the chosen path."""
        super().setup(stage)
        self._prepare_data_path()

    def _loader(self, indices, shuffle: bool, drop_last: bool):
        kwargs = self._device_loader_kwargs()
        n_samples_per_label = kwargs.pop("n_samples_per_label", None)
        if len(self._labeled_indices) != 0:
            return SemiSupervisedDeviceDataLoader(
                self.adata_manager,
                n_samples_per_label=n_samples_per_label,
                indices=indices,
                shuffle=shuffle,
                drop_last=drop_last,
                **kwargs,
            )
        return DeviceDataLoader(
            self.adata_manager, indices=indices, shuffle=shuffle, drop_last=drop_last, **kwargs
        )

    def train_dataloader(self):
        """Create the train data loader."""
        if self.resolved_data_path == "scvi":
            return super().train_dataloader()
        return self._loader(self.train_idx, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self):
        """Create the validation data loader."""
        if self.resolved_data_path == "scvi":
            return super().val_dataloader()
        if len(self.val_idx) > 0:
            return self._loader(self.val_idx, shuffle=False, drop_last=False)
        return None

    def test_dataloader(self):
        """Create the test data loader."""
        if self.resolved_data_path == "scvi":
            return super().test_dataloader()
        if len(self.test_idx) > 0:
            return self._loader(self.test_idx, shuffle=False, drop_last=False)
        return None


def make_data_loader(
    adata_manager,
    indices=None,
    batch_size: int = 128,
    shuffle: bool = False,
    data_path: str = "auto",
    device: torch.device | str | None = None,
    **kwargs,
):
    """A loader for a model's ``get_*`` methods on the fast data path.

    Called like scvi's ``AnnDataLoader`` (a model sets ``_data_loader_cls =
    staticmethod(make_data_loader)`` and scvi's ``_make_data_loader`` uses it). It returns a
    :class:`DeviceDataLoader` for in-memory data, a :class:`BackedDataLoader` for a backed
    AnnData (minibatches keep the order of ``indices``; scvi's loader sorts each backed
    minibatch) and scvi's ``AnnDataLoader`` otherwise, by the rule of :func:`resolve_data_path`.
    Minibatches are returned on ``device`` (default: the CPU; the model moves them, as with
    scvi's loader). cellvi's loaders here make no draw from torch's global generator when they
    start (torch's ``DataLoader`` draws a base seed per iteration), so a seeded sampling
    ``get_*`` method gives the same draws called once or chunk by chunk
    (:func:`cellvi.dataloaders.write_in_chunks`).
    """
    from scvi.dataloaders import AnnDataLoader

    target = torch.device("cpu") if device is None else torch.device(device)
    path = resolve_data_path(data_path, adata_manager, target, kwargs.get("data_and_attributes"))
    common = dict(indices=indices, batch_size=batch_size, shuffle=shuffle, **kwargs)
    if path in ("device", "stream"):
        return DeviceDataLoader(
            adata_manager, device=target, stream=path == "stream", draw_base_seed=False, **common
        )
    if path == "backed":
        return BackedDataLoader(adata_manager, device=target, draw_base_seed=False, **common)
    return AnnDataLoader(adata_manager, **common)
