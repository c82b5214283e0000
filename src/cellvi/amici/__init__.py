"""AMICI: cell-cell interactions from spatial transcriptomics by cross-attention.

- :class:`AMICI` -- the model (set-up, training, predictions, save/load).
- :class:`AMICIModule` -- its torch module, with the hooks used by :mod:`cellvi.interpretation`.
- :class:`AttentionPenaltyMonitor` -- Lightning callback ramping the attention-entropy penalty.
"""

from __future__ import annotations

from cellvi._lazy import lazy_exports

# Imported on first use, so that ``cellvi amici --help`` does not pay for torch and Lightning.
_LAZY: dict[str, str] = {
    "AMICI": "cellvi.amici._model",
    "AMICIModule": "cellvi.amici._module",
    "AttentionPenaltyMonitor": "cellvi.amici._callbacks",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
