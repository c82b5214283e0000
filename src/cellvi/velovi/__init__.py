"""VELOVI: RNA velocity by variational inference (veloVI), with preprocessing and scVelo/CellRank export.

- :class:`cellvi.VELOVI` -- the model (also ``cellvi.velovi.VELOVI``); :class:`VELOVAE` -- its torch module.
- :func:`compute_moments` -- kNN-smoothed spliced/unspliced abundances (``Ms``/``Mu``) without scVelo.
- :func:`preprocess_data` -- per-gene min-max scaling and gene filtering by a steady-state fit.
- :func:`write_velovi_results` -- velocity, latent time, fit parameters and uncertainty where scVelo and
  CellRank read them.
"""

from ._export import write_velovi_results
from ._model import VELOVI
from ._module import VELOVAE
from ._preprocess import compute_moments, preprocess_data

__all__ = ["VELOVAE", "VELOVI", "compute_moments", "preprocess_data", "write_velovi_results"]
