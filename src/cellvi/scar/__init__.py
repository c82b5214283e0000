"""SCAR: ambient RNA removal from droplet data (native + ambient mixture per cell)."""

from ._model import SCAR
from ._module import SCARModule

__all__ = ["SCAR", "SCARModule"]
