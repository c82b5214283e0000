"""Minibatch order per epoch, on the data's device, with scvi's and ``DistributedSampler``'s semantics."""

from __future__ import annotations

from collections.abc import Iterator
from math import ceil

import torch

from cellvi._validation import check_positive_int


class MinibatchSampler:
    """Positions of each minibatch, for one process or one rank of several.

    Two modes, both with the exact semantics of the sampler scvi-tools would use:

    * **single process, no seed** (``num_replicas == 1`` and ``seed is None``): like scvi's
      default ``BatchSampler(RandomSampler)``. Each epoch draws a seed from torch's global
      generator, so ``scvi.settings.seed`` fixes the order; on the CPU the order is identical to
      scvi's loader. The permutation is drawn on ``device``.
    * **distributed or seeded** (``num_replicas > 1`` or a ``seed``): like scvi's
      ``BatchDistributedSampler`` (:class:`torch.utils.data.DistributedSampler`). The permutation
      depends only on ``seed + epoch`` (call :meth:`set_epoch`; Lightning does), so all ranks
      agree; it is padded by repeating the first positions to a multiple of ``num_replicas`` (or
      cut, with ``drop_dataset_tail``) and rank ``r`` takes every ``num_replicas``-th position
      from ``r``. The union of the ranks' minibatch ``k`` is minibatch ``k`` of a single process
      with ``batch_size * num_replicas`` and the same seed.

    Parameters
    ----------
    n
        Number of observations to sample from (positions ``0..n-1``).
    batch_size
        Minibatch size (per rank).
    shuffle
        Whether to shuffle positions each epoch.
    drop_last
        Drop the last incomplete minibatch.
    device
        Device of the returned position tensors.
    num_replicas
        Number of processes sharing the data.
    rank
        This process's rank in ``0..num_replicas-1``.
    seed
        Seed of the distributed/seeded mode; ``None`` means 0 when ``num_replicas > 1`` (as
        :class:`~torch.utils.data.DistributedSampler`).
    drop_dataset_tail
        In the distributed mode, cut the positions to a multiple of ``num_replicas`` instead of
        padding them.
    """

    def __init__(
        self,
        n: int,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        drop_dataset_tail: bool = False,
    ):
        self.n = int(n)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.num_replicas = check_positive_int(num_replicas, "num_replicas")
        if not 0 <= int(rank) < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}); got {rank}.")
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.drop_dataset_tail = bool(drop_dataset_tail)
        self.device = torch.device(device)
        self.distributed = self.num_replicas > 1 or seed is not None
        self.seed = 0 if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the distributed/seeded mode (the order is a function of seed + epoch)."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Positions this rank visits per epoch."""
        if not self.distributed:
            return self.n
        if self.drop_dataset_tail and self.n % self.num_replicas:
            return ceil((self.n - self.num_replicas) / self.num_replicas)
        return ceil(self.n / self.num_replicas)

    def batch_sizes(self) -> list[int]:
        """Sizes of this rank's minibatches in one epoch."""
        n, bs = self.num_samples, self.batch_size
        sizes = [bs] * (n // bs)
        if n % bs and not self.drop_last:
            sizes.append(n % bs)
        return sizes

    def __len__(self) -> int:
        return len(self.batch_sizes())

    def epoch_order(self) -> torch.Tensor:
        """Positions this rank visits this epoch, in order (int64 on ``device``)."""
        if not self.distributed:
            if not self.shuffle:
                return torch.arange(self.n, device=self.device)
            # the same draw from the global generator as torch's RandomSampler
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            return torch.randperm(self.n, generator=generator, device=self.device)
        if self.shuffle:
            # CPU generator: the same permutation on every rank, whatever its device
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        total = self.num_samples * self.num_replicas
        if total > self.n:
            order = order.repeat(ceil(total / max(self.n, 1)))[:total]
        else:
            order = order[:total]
        return order[self.rank : total : self.num_replicas].to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.epoch_order()
        start = 0
        for size in self.batch_sizes():
            yield order[start : start + size]
            start += size
