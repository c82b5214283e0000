"""FADVI: batch / label / residual factor disentanglement, label prediction and attributions.

- :class:`FADVI` -- the model (scvi-tools API: ``setup_anndata``, ``train``, ``get_latent_representation``,
  ``predict``, ``get_normalized_expression``, ``differential_expression``, ``load_query_data``...).
- :class:`FADVAE` -- its torch module; :class:`FADVITrainingPlan` -- its training plan.
- :func:`evaluate_disentanglement` -- leakage between factors measured by fresh probes on held-out cells.
"""

from ._metrics import evaluate_disentanglement, probe_latents
from ._model import FADVI
from ._module import FADVAE
from ._plan import FADVITrainingPlan

__all__ = ["FADVI", "FADVAE", "FADVITrainingPlan", "evaluate_disentanglement", "probe_latents"]
