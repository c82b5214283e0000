"""Lightning callbacks for :class:`cellvi.AMICI`."""

from __future__ import annotations

import math
from typing import Literal

from lightning.pytorch.callbacks import Callback


class AttentionPenaltyMonitor(Callback):
    """Ramp the attention-entropy penalty coefficient over the epochs.

    At the start of each epoch sets ``module.attention_penalty_coef`` to 0 before ``epoch_start``,
    a log- or linear ramp from ``start_val`` to ``end_val`` over ``[epoch_start, epoch_end)``, and
    ``end_val`` from ``epoch_end`` on. The penalty is added to the training loss only; the
    reconstruction loss and ELBO metrics (used by early stopping) do not include it.

    Parameters
    ----------
    epoch_start
        First epoch with a non-zero coefficient.
    epoch_end
        Epoch from which the coefficient stays at ``end_val``.
    start_val
        Coefficient at ``epoch_start``.
    end_val
        Final coefficient.
    flavor
        ``"log"`` (geometric) or ``"linear"`` interpolation.

    Examples
    --------
    >>> from cellvi.amici import AttentionPenaltyMonitor
    >>> cb = AttentionPenaltyMonitor(epoch_start=2, epoch_end=4, start_val=1e-4, end_val=1e-2)
    >>> [round(cb.value(e), 6) for e in range(6)]
    [0.0, 0.0, 0.0001, 0.001, 0.01, 0.01]
    """

    def __init__(
        self,
        epoch_start: int = 10,
        epoch_end: int = 30,
        start_val: float = 1e-4,
        end_val: float = 1e-3,
        flavor: Literal["log", "linear"] = "log",
    ):
        super().__init__()
        if flavor not in ("log", "linear"):
            raise ValueError(f"flavor must be 'log' or 'linear', got {flavor!r}.")
        if not 0 <= epoch_start <= epoch_end:
            raise ValueError(
                f"need 0 <= epoch_start <= epoch_end, got epoch_start={epoch_start}, epoch_end={epoch_end}."
            )
        if start_val < 0 or end_val < 0 or (flavor == "log" and (start_val <= 0 or end_val <= 0)):
            raise ValueError(
                f"start_val and end_val must be >= 0 (> 0 for flavor='log'), got {start_val!r}, {end_val!r}."
            )
        self.epoch_start, self.epoch_end = int(epoch_start), int(epoch_end)
        self.start_val, self.end_val, self.flavor = float(start_val), float(end_val), flavor

    def value(self, epoch: int) -> float:
        """Coefficient used during ``epoch``."""
        if epoch < self.epoch_start:
            return 0.0
        if epoch >= self.epoch_end:
            return self.end_val
        t = (epoch - self.epoch_start) / (self.epoch_end - self.epoch_start)
        if self.flavor == "log":
            return math.exp((1 - t) * math.log(self.start_val) + t * math.log(self.end_val))
        return (1 - t) * self.start_val + t * self.end_val

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl_module.module.attention_penalty_coef = self.value(trainer.current_epoch)
