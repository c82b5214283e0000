"""One fast data path for every cellvi model.

scvi-tools feeds minibatches through a per-minibatch Python dataset that slices the AnnData
matrices and makes sparse rows dense on the CPU. cellvi reads the registered arrays once into a
:class:`TensorStore` on the training device (sparse stays CSR), draws the shuffled minibatch
positions there and gathers each minibatch with a few array operations; only the minibatch rows
are ever dense. When the data do not fit on an accelerator, the store stays on the CPU and each
compact (still sparse) minibatch is copied through pinned memory (``data_path="stream"``).

- :class:`DeviceDataLoader` -- drop-in for ``scvi.dataloaders.AnnDataLoader``: same batches.
- :class:`DataSplitter`, :class:`SemiSupervisedDataSplitter` -- drop-ins for scvi's splitters
  (same train / validation / test split) with a ``data_path`` argument.
- :class:`DataPathMixin`, :class:`SemiSupervisedDataPathMixin`, :func:`with_data_path` -- what a
  model adds to get ``train(..., data_path="auto")``.
- :class:`BackedDataLoader` -- larger-than-memory data: a backed (on-disk) AnnData read in
  contiguous chunks and block-shuffled (``data_path="backed"``); memory is bounded by one buffer
  of ``chunk_size * buffer_chunks`` rows.
- :func:`make_data_loader` -- the same choice for a model's ``get_*`` methods
  (``_data_loader_cls = staticmethod(make_data_loader)``).
- :func:`resolve_data_path` -- the rule of ``data_path="auto"``.
- :func:`write_in_chunks` -- larger-than-memory outputs: a ``get_*`` method (denoised counts,
  latent representation, velocity ...) called one chunk of cells at a time and appended to an
  h5ad file (sparse stays CSR).

Memory use
----------
Training from a backed AnnData (``anndata.read_h5ad(path, backed="r")``, ``data_path="backed"``
or ``"auto"``) holds one buffer of ``chunk_size * buffer_chunks`` rows of the registered arrays
(as read from disk, sparse stays sparse) plus the model and one dense minibatch; the matrix is
never whole in memory. :func:`write_in_chunks` holds one chunk's output (``chunk_size`` rows,
CSR or dense) plus the method's own minibatches, whatever the number of cells, so a model set up
on a backed AnnData writes its outputs for an atlas with memory bounded by the chunk size.

Multi-process training (DDP)
----------------------------
With ``strategy="ddp"`` (or ``"ddp_spawn"``, ``"ddp_notebook"``) scvi passes
``distributed_sampler=True`` to the splitter; each rank then holds the registered arrays on its
own device and iterates its share of every minibatch, with the semantics of
:class:`torch.utils.data.DistributedSampler` (ranks agree on a permutation drawn from
``seed + epoch``). ``batch_size`` is per rank. On one machine::

    model.train(accelerator="gpu", devices=4, strategy="ddp")  # from a script

On several machines, run the same script on each with ``torchrun`` (or a cluster launcher)::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_endpoint=HOST:29500 train.py

On the CPU, ``accelerator="cpu", devices=2, strategy="ddp"`` uses the gloo backend
(``tests/dataloaders/test_ddp.py`` launches two such processes and checks that they train the
same parameters as one process with twice the minibatch size).
"""

from ._backed import BackedDataLoader, backed_supported
from ._chunked import write_in_chunks
from ._loader import DeviceDataLoader
from ._mixin import DATA_PATH_DOC, DataPathMixin, SemiSupervisedDataPathMixin, with_data_path
from ._sampler import MinibatchSampler
from ._semi import SemiSupervisedDeviceDataLoader
from ._splitter import (
    DATA_PATHS,
    DEVICE_MEMORY_FRACTION,
    DataSplitter,
    SemiSupervisedDataSplitter,
    make_data_loader,
    resolve_data_path,
)
from ._store import TensorStore, estimate_nbytes, registered_in_memory

__all__ = [
    "DATA_PATHS",
    "DATA_PATH_DOC",
    "DEVICE_MEMORY_FRACTION",
    "BackedDataLoader",
    "DataPathMixin",
    "DataSplitter",
    "DeviceDataLoader",
    "MinibatchSampler",
    "SemiSupervisedDataPathMixin",
    "SemiSupervisedDataSplitter",
    "SemiSupervisedDeviceDataLoader",
    "TensorStore",
    "backed_supported",
    "estimate_nbytes",
    "make_data_loader",
    "registered_in_memory",
    "resolve_data_path",
    "with_data_path",
    "write_in_chunks",
]
