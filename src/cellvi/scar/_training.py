"""Training plan of SCAR: cellvi's per-epoch-logging plan with the KL term at full weight from the start."""

from __future__ import annotations

from .._training import EpochMetricsTrainingPlan


class SCARTrainingPlan(EpochMetricsTrainingPlan):
    """:class:`~cellvi._training.EpochMetricsTrainingPlan` with no KL warm-up by default.

    The KL term has full weight from the start (``n_epochs_kl_warmup=None``): scvi-tools' 400-epoch
    warm-up never completes at SCAR's default epochs, and the weaker regularisation lets the native
    frequencies absorb ambient RNA (the contamination is then over-estimated and less well ranked
    in our simulations). Pass ``plan_kwargs={"n_epochs_kl_warmup": 400}`` for scvi-tools' behaviour.
    """

    def __init__(self, module, *, n_epochs_kl_warmup: int | None = None, **kwargs):
        super().__init__(module, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)
