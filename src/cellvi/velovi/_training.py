"""Training plan for VELOVI: cellvi's per-epoch-logging plan (see :mod:`cellvi._training`)."""

from __future__ import annotations

from .._training import EpochMetricsTrainingPlan


class VELOVITrainingPlan(EpochMetricsTrainingPlan):
    """:class:`~cellvi._training.EpochMetricsTrainingPlan` for veloVI.

    The logged names are scvi-tools' (``train_loss``, ``elbo_train``, ``reconstruction_loss_train``,
    ``kl_local_train``, ``kl_global_train``, ``kl_weight`` and their ``validation`` counterparts),
    logged once per epoch, so ``model.history``, early stopping on ``elbo_validation`` and the
    progress bar work as before. The optimiser (AdamW by default for veloVI) is fused where available.
    """
