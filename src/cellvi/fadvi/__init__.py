"""FADVI: batch / label / residual factor disentanglement, label prediction and attributions.

- :class:`FADVI` -- the model (scvi-tools API: ``setup_anndata``, ``train``, ``get_latent_representation``,
  ``predict``, ``get_normalized_expression``, ``differential_expression``, ``load_query_data``...).
- :class:`FADVAE` -- its torch module; :class:`FADVITrainingPlan` -- its training plan.
- :func:`evaluate_disentanglement` -- leakage between factors measured by fresh probes on held-out cells.
"""

from __future__ import annotations

from cellvi._lazy import lazy_exports

# Imported on first use, so that ``cellvi fadvi --help`` does not pay for torch and Lightning.
_LAZY: dict[str, str] = {
    "FADVI": "cellvi.fadvi._model",
    "FADVAE": "cellvi.fadvi._module",
    "FADVITrainingPlan": "cellvi.fadvi._plan",
    "evaluate_disentanglement": "cellvi.fadvi._metrics",
    "probe_latents": "cellvi.fadvi._metrics",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
