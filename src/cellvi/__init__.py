"""cellvi: deep generative models for single-cell and spatial omics.

One install, four models built on scvi-tools:

- :class:`cellvi.SCAR` -- ambient RNA removal from droplet data.
- :class:`cellvi.VELOVI` -- RNA velocity by variational inference.
- :class:`cellvi.FADVI` -- batch / label / residual disentanglement, label prediction, attributions.
- :class:`cellvi.AMICI` and :mod:`cellvi.interpretation` -- cell-cell interactions from spatial data.

Seeded simulators with known ground truth live in :mod:`cellvi.data`.

Models and submodules are imported on first use, so ``import cellvi`` stays cheap
(the command line's ``--help`` does not pay for torch).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cellvi._lazy import lazy_exports

try:
    __version__ = version("cellvi")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_MODELS: dict[str, str] = {
    "VELOVI": "cellvi.velovi",
    "SCAR": "cellvi.scar",
    "AMICI": "cellvi.amici",
    "FADVI": "cellvi.fadvi",
}
_SUBMODULES = (
    "data",
    "dataloaders",
    "interpretation",
)

__all__ = list(_MODELS) + list(_SUBMODULES)

# the model packages resolve too (``cellvi.velovi.preprocess_data``), without being star-exported
_PACKAGES = {name: f"cellvi.{name}" for name in (*_SUBMODULES, *(m.lower() for m in _MODELS))}

__getattr__, __dir__ = lazy_exports(__name__, _MODELS, _PACKAGES)
