"""Semi-supervised loader: a full minibatch and a labelled minibatch per step, as scvi's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scvi import REGISTRY_KEYS
from scvi.data._utils import get_anndata_attribute

from ._loader import DeviceDataLoader, _as_indices, _draw_base_seed


def labels_of(adata_manager) -> tuple[np.ndarray, object]:
    """Original (un-encoded) labels of every observation and the unlabelled category."""
    state = adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
    labels = get_anndata_attribute(
        adata_manager.adata,
        adata_manager.data_registry.labels.attr_name,
        state.original_key,
        mod_key=getattr(adata_manager.data_registry.labels, "mod_key", None),
    ).ravel()
    return labels, state.unlabeled_category


class _Restarting:
    """Cycle over a loader, starting a fresh (reshuffled) pass when one ends.

    ``itertools.cycle`` (scvi's choice) replays the first pass's minibatches, which keeps a dense
    copy of every labelled minibatch in memory for the whole epoch.
    """

    def __init__(self, loader: DeviceDataLoader, first_seed_drawn: bool = False):
        self.loader = loader
        self._it = loader._batches(seed_drawn=first_seed_drawn)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)


class SemiSupervisedDeviceDataLoader:
    """Pairs of minibatches ``(full, labelled)`` for semi-supervised training.

    A drop-in for :class:`scvi.dataloaders.SemiSupervisedDataLoader` built on
    :class:`DeviceDataLoader`: both loaders share one :class:`TensorStore`. Each step yields a
    minibatch of all ``indices`` and one of the labelled observations among them (each label
    class subsampled to ``n_samples_per_label`` per epoch when given, with numpy's global
    generator as scvi). The epoch follows the longer loader and the shorter one restarts with a
    fresh shuffle (scvi replays its first pass from a cache). Without labelled observations among
    ``indices`` it yields the full minibatches alone.

    Parameters
    ----------
    adata_manager
        :class:`~scvi.data.AnnDataManager` object that has been created via ``setup_anndata``.
    n_samples_per_label
        Number of subsamples for each label class to sample per epoch. By default, there
        is no label subsampling.
    indices
        The indices of the observations in the adata to load.
    shuffle
        Whether the data should be shuffled.
    batch_size
        Minibatch size to load each iteration.
    data_and_attributes
        Registry keys to load (list) or keys and numpy dtypes (dict). ``None`` loads all.
    drop_last
        Drop the last incomplete minibatch of each loader.
    distributed_sampler
        Give each process its share of both loaders (see :class:`DeviceDataLoader`). As in one
        process, the epoch follows the longer loader (scvi's distributed loader stops at the
        shorter one, so with few labelled cells an epoch skips most of the data).
    **kwargs
        Passed to :class:`DeviceDataLoader` (``store``, ``device``, ``stream``, ``seed`` ...).
    """

    def __init__(
        self,
        adata_manager,
        n_samples_per_label: int | None = None,
        indices=None,
        shuffle: bool = False,
        batch_size: int = 128,
        data_and_attributes: list | dict | None = None,
        drop_last: bool = False,
        distributed_sampler: bool = False,
        **kwargs,
    ):
        self.adata_manager = adata_manager
        self.indices = _as_indices(indices, adata_manager.adata.n_obs)
        if n_samples_per_label is not None and (
            isinstance(n_samples_per_label, bool) or int(n_samples_per_label) < 1
        ):
            raise ValueError(
                f"n_samples_per_label must be a positive integer or None; got {n_samples_per_label!r}."
            )
        self.n_samples_per_label = n_samples_per_label
        labels, unlabeled = labels_of(adata_manager)
        here = labels[self.indices]
        self.labeled_locs = [self.indices[here == label] for label in np.unique(labels) if label != unlabeled]
        self._loader_kwargs = dict(
            shuffle=shuffle,
            batch_size=batch_size,
            data_and_attributes=data_and_attributes,
            drop_last=drop_last,
            distributed_sampler=distributed_sampler,
            **kwargs,
        )
        self.full = DeviceDataLoader(adata_manager, indices=self.indices, **self._loader_kwargs)
        # the labelled loader shares the full loader's store (the data are held once)
        self._loader_kwargs["store"] = self.full.store
        self._loader_kwargs["device"] = self.full.device
        self.labelled = self._labelled_loader()
        self._distributed = bool(distributed_sampler)
        self.batch_sampler = None  # Lightning inspects it

    @property
    def store(self):
        """The :class:`TensorStore` both loaders read from."""
        return self.full.store

    @property
    def sampler(self):
        """The loader itself: Lightning calls ``sampler.set_epoch``, which sets both loaders' epoch."""
        return self

    def subsample_labels(self) -> np.ndarray:
        """Subsamples each label class by taking up to n_samples_per_label samples per class."""
        if not self.labeled_locs:
            return np.array([], dtype=np.int64)
        if self.n_samples_per_label is None:
            return np.concatenate(self.labeled_locs)
        picked = [
            loc
            if len(loc) < self.n_samples_per_label
            else np.random.choice(loc, self.n_samples_per_label, replace=False)
            for loc in self.labeled_locs
        ]
        return np.concatenate(picked)

    def _labelled_loader(self) -> DeviceDataLoader:
        return DeviceDataLoader(self.adata_manager, indices=self.subsample_labels(), **self._loader_kwargs)

    def resample_labels(self) -> None:
        """Resamples the labeled data (called each epoch by scvi's ``SubSampleLabels``)."""
        epoch = getattr(self.full.sampler, "epoch", 0)
        self.labelled = self._labelled_loader()
        if hasattr(self.labelled.sampler, "set_epoch"):
            self.labelled.sampler.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of both loaders' samplers (distributed/seeded mode)."""
        for loader in (self.full, self.labelled):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.full), len(self.labelled))

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        return self._steps()

    def _steps(self) -> Iterator[tuple[dict, dict]]:
        # runs on the first ``next`` (Lightning calls ``iter`` once just to check the loader)
        if len(self.labelled.indices) == 0:
            # e.g. a validation set without labelled cells: full minibatches alone, which scvi's
            # plans read as "no labelled tensors" (scvi's loader yields nothing, skipping the set)
            yield from self.full
            return
        loaders = [self.full, self.labelled]
        largest = int(np.argmax([len(dl) for dl in loaders]))
        # the random draws of scvi's ConcatDataLoader: one per loader as its iteration starts
        # (the restarting ones first, then the largest), then each loader's shuffle on first use
        for _ in loaders:
            _draw_base_seed()
        its = [
            dl._batches(seed_drawn=True) if i == largest else _Restarting(dl, first_seed_drawn=True)
            for i, dl in enumerate(loaders)
        ]
        for _ in range(len(loaders[largest])):
            yield tuple(next(it) for it in its)
