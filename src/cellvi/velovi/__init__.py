"""VELOVI: RNA velocity by variational inference (veloVI), with preprocessing and scVelo/CellRank export.

- :class:`cellvi.VELOVI` -- the model (also ``cellvi.velovi.VELOVI``); :class:`VELOVAE` -- its torch module.
- :func:`compute_moments` -- kNN-smoothed spliced/unspliced abundances (``Ms``/``Mu``) without scVelo.
- :func:`preprocess_data` -- per-gene min-max scaling and gene filtering by a steady-state fit.
- :func:`write_velovi_results` -- velocity, latent time, fit parameters and uncertainty where scVelo and
  CellRank read them.
"""

from __future__ import annotations

from cellvi._lazy import lazy_exports

# Imported on first use, so that ``cellvi velovi --help`` does not pay for torch and Lightning.
_LAZY: dict[str, str] = {
    "VELOVAE": "cellvi.velovi._module",
    "VELOVI": "cellvi.velovi._model",
    "compute_moments": "cellvi.velovi._preprocess",
    "preprocess_data": "cellvi.velovi._preprocess",
    "write_velovi_results": "cellvi.velovi._export",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
