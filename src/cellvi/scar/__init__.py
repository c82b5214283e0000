"""SCAR: ambient RNA removal from droplet data (native + ambient mixture per cell).

The model is imported on first use, so ``cellvi scar --help`` does not pay for torch.
"""

from __future__ import annotations

from cellvi._lazy import lazy_exports

_LAZY = {"SCAR": "cellvi.scar._model", "SCARModule": "cellvi.scar._module"}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
