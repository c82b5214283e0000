"""Training plan for FADVI: cellvi's per-epoch-logging plan (see :mod:`cellvi._training`)."""

from __future__ import annotations

from .._training import EpochMetricsTrainingPlan


class FADVITrainingPlan(EpochMetricsTrainingPlan):
    """:class:`~cellvi._training.EpochMetricsTrainingPlan` for FADVI.

    One optimizer and one backward pass per step: the adversaries learn on detached latents inside
    the module's loss, so no alternating steps are needed. Each step reads one minibatch (all
    cells, labeled or not); unlabeled cells are masked out of the label terms by the module.

    The logged epoch values are ``train_loss``, ``elbo_train``, ``reconstruction_loss_train``,
    ``kl_local_train``, ``kl_global_train``, every extra metric of the loss (``elbo_loss_train``,
    ``sup_loss_b_train``, ``adv_loss_lb_train``, ...), the label head's ``classification_loss_train``
    and ``accuracy_train`` on the labeled cells, ``kl_weight``, and the ``validation`` counterparts.
    """
