"""How a model adopts the fast data path: a mixin adding ``data_path`` to ``train``."""

from __future__ import annotations

from ._splitter import DataSplitter, SemiSupervisedDataSplitter, check_data_path

DATA_PATH_DOC = """data_path
    How minibatches reach the model. ``"auto"`` (default): the registered arrays on the training
    device when they fit in half its free memory (always on the CPU), else streamed from the CPU
    through pinned memory; a backed (on-disk) AnnData is read in contiguous chunks. ``"device"``:
    arrays on the training device (sparse stays sparse; only minibatches are made dense).
    ``"stream"``: arrays on the CPU, each compact minibatch copied to the device. ``"backed"``:
    chunks read from disk, block-shuffled, memory bounded by one buffer of chunks. ``"scvi"``:
    scvi-tools' ``AnnDataLoader``. On the CPU, ``"device"`` and ``"scvi"`` give identical
    minibatches (and seeded training) for the same seed."""


def with_data_path(datasplitter_kwargs: dict | None, data_path: str = "auto") -> dict:
    """A copy of ``datasplitter_kwargs`` with ``data_path`` set (the caller's dict is not modified).

    An explicit ``data_path`` other than ``"auto"`` wins over one inside ``datasplitter_kwargs``.
    """
    out = dict(datasplitter_kwargs or {})
    if data_path != "auto" or "data_path" not in out:
        out["data_path"] = check_data_path(data_path)
    else:
        check_data_path(out["data_path"])
    return out


class DataPathMixin:
    """Train on cellvi's fast data path; adds ``data_path`` to ``train``.

    Put it before scvi's ``UnsupervisedTrainingMixin`` in the model's bases. It sets
    ``_data_splitter_cls`` to :class:`DataSplitter` and forwards ``data_path`` to it through
    ``datasplitter_kwargs``; every other argument of ``train`` is the inherited one.

    Examples
    --------
    >>> from scvi.model import SCVI
    >>> from cellvi.dataloaders import DataPathMixin
    >>> class FastSCVI(DataPathMixin, SCVI):
    ...     pass
    >>> FastSCVI._data_splitter_cls.__module__
    'cellvi.dataloaders._splitter'
    """

    _data_splitter_cls = DataSplitter

    def train(self, *args, data_path: str = "auto", datasplitter_kwargs: dict | None = None, **kwargs):
        """Train the model (scvi's ``train``, plus ``data_path``).

        Parameters
        ----------
        *args, **kwargs
            Those of the inherited ``train``.
        datasplitter_kwargs
            Additional keyword arguments passed into :class:`cellvi.dataloaders.DataSplitter`.
        """
        datasplitter_kwargs = with_data_path(datasplitter_kwargs, data_path)
        return super().train(*args, datasplitter_kwargs=datasplitter_kwargs, **kwargs)

    train.__doc__ = (
        train.__doc__.rstrip()
        + "\n"
        + "\n".join("        " + line if line else line for line in DATA_PATH_DOC.splitlines())
        + "\n"
    )


class SemiSupervisedDataPathMixin(DataPathMixin):
    """As :class:`DataPathMixin` for models trained with scvi's ``SemisupervisedTrainingMixin``.

    Sets ``_data_splitter_cls`` to :class:`SemiSupervisedDataSplitter`.
    """

    _data_splitter_cls = SemiSupervisedDataSplitter
