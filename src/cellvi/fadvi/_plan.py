"""Training plan for FADVI: scvi-tools' TrainingPlan plus label-head accuracy on the labeled cells."""

from __future__ import annotations

import torch
from scvi.module.base import LossOutput
from scvi.train import TrainingPlan


class FADVITrainingPlan(TrainingPlan):
    """:class:`scvi.train.TrainingPlan` that also logs the label head's cross-entropy and accuracy.

    One optimizer and one backward pass per step: the adversaries learn on detached latents inside
    the module's loss, so no alternating steps are needed. Each step reads one minibatch (all
    cells, labeled or not); unlabeled cells are masked out of the label terms by the module.
    """

    @torch.inference_mode()
    def compute_and_log_metrics(self, loss_output: LossOutput, metrics, mode: str):
        super().compute_and_log_metrics(loss_output, metrics, mode)
        if loss_output.classification_loss is None or loss_output.logits is None:
            return
        n = int(loss_output.true_labels.shape[0])
        acc = (loss_output.logits.argmax(-1) == loss_output.true_labels).float().mean()
        kw = {"on_step": False, "on_epoch": True, "batch_size": n, "sync_dist": self.use_sync_dist}
        self.log(f"classification_loss_{mode}", loss_output.classification_loss.detach(), **kw)
        self.log(f"accuracy_{mode}", acc, **kw)
