"""SCAR: ambient RNA removal from droplet data (native + ambient mixture per cell).

The model is imported on first use, so ``cellvi scar --help`` does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {"SCAR": "cellvi.scar._model", "SCARModule": "cellvi.scar._module"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellvi.scar' has no attribute {name!r}")
