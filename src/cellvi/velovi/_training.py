"""Training plan for VELOVI: scvi-tools' :class:`~scvi.train.TrainingPlan` with per-epoch metric logging."""

from __future__ import annotations

import torch
from scvi.module.base import LossOutput
from scvi.train import TrainingPlan


class VELOVITrainingPlan(TrainingPlan):
    """:class:`~scvi.train.TrainingPlan` that accumulates the ELBO terms on the device and logs them once
    per epoch.

    The Adam/AdamW update uses PyTorch's fused kernel where available (one kernel for all parameters).

    scvi-tools logs five metrics through Lightning on every step, which costs as much as a forward and
    backward pass of veloVI on a typical minibatch. The logged names and values are the same
    (``train_loss``, ``elbo_train``, ``reconstruction_loss_train``, ``kl_local_train``,
    ``kl_global_train``, ``kl_weight`` and their ``validation`` counterparts), so ``model.history``,
    early stopping on ``elbo_validation`` and the progress bar work as before.
    """

    def _optimizer_creator_fn(self, optimizer_cls):
        """Adam / AdamW with the plan's settings, using the fused kernel on CPU and CUDA (same update)."""

        def create(params):
            params = list(params)
            devices = {p.device.type for p in params}
            fused = bool(params) and devices <= {"cpu", "cuda"}
            return optimizer_cls(
                params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, fused=fused
            )

        return create

    def __init__(self, module, **kwargs):
        super().__init__(module, **kwargs)
        self._sums: dict[str, torch.Tensor | None] = {"train": None, "validation": None}

    def _accumulate(self, mode: str, out: LossOutput) -> None:
        values = torch.stack(
            [
                out.loss.detach(),
                out.reconstruction_loss_sum.detach(),
                out.kl_local_sum.detach(),
                torch.as_tensor(out.kl_global_sum, device=out.loss.device).detach(),
                torch.as_tensor(float(out.n_obs_minibatch), device=out.loss.device),
                torch.ones((), device=out.loss.device),
            ]
        ).float()
        prev = self._sums[mode]
        self._sums[mode] = values if prev is None else prev + values

    def _log_epoch(self, mode: str) -> None:
        sums = self._sums[mode]
        self._sums[mode] = None
        if sums is None:
            return
        loss, rec, kl_local, kl_global, n_obs, n_steps = sums
        n_total = self.n_obs_training if mode == "train" else self.n_obs_validation
        n_total = 1 if not n_total or n_total < 1 else n_total
        kl_global = kl_global / n_steps
        metrics = {
            f"elbo_{mode}": (rec + kl_local) / n_obs + kl_global / n_total,
            f"reconstruction_loss_{mode}": rec / n_obs,
            f"kl_local_{mode}": kl_local / n_obs,
            f"kl_global_{mode}": kl_global,
        }
        name = "train_loss" if mode == "train" else "validation_loss"
        self.log(
            name,
            loss / n_steps,
            on_step=False,
            on_epoch=True,
            prog_bar=mode == "train",
            sync_dist=self.use_sync_dist,
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=self.use_sync_dist)

    def training_step(self, batch, batch_idx):
        """Training step: forward, loss, accumulate the metrics (logged at epoch end)."""
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        _, _, out = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._accumulate("train", out)
        return out.loss

    def on_train_epoch_end(self):
        """Log the epoch's training metrics and the KL weight reached."""
        if "kl_weight" in self.loss_kwargs:
            self.log("kl_weight", float(self.loss_kwargs["kl_weight"]), on_step=False, on_epoch=True)
        self._log_epoch("train")
        super().on_train_epoch_end()

    def validation_step(self, batch, batch_idx):
        """Validation step: forward, loss, accumulate the metrics (logged at epoch end)."""
        _, _, out = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._accumulate("validation", out)

    def on_validation_epoch_end(self):
        """Log the epoch's validation metrics (early stopping reads ``elbo_validation``)."""
        self._log_epoch("validation")
        super().on_validation_epoch_end()
