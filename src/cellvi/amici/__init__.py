"""AMICI: cell-cell interactions from spatial transcriptomics by cross-attention.

- :class:`AMICI` -- the model (set-up, training, predictions, save/load).
- :class:`AMICIModule` -- its torch module, with the hooks used by :mod:`cellvi.interpretation`.
- :class:`AttentionPenaltyMonitor` -- Lightning callback ramping the attention-entropy penalty.
"""

from ._callbacks import AttentionPenaltyMonitor
from ._model import AMICI
from ._module import AMICIModule

__all__ = ["AMICI", "AMICIModule", "AttentionPenaltyMonitor"]
