"""Seeded simulators with known ground truth.

Every simulator takes a ``seed`` and size arguments and returns an :class:`~anndata.AnnData`
whose ground truth is kept beside the observed data (``layers``, ``obs``, ``obsm``, ``varm``, ``uns``),
so tests, demos, benchmarks and users share the same data.

- :func:`simulate_ambient` -- droplet data with ambient RNA contamination (SCAR).
- :func:`simulate_spatial` -- spatial tissue with planted sender -> receiver effects (AMICI).
- :func:`simulate_velocity` -- spliced/unspliced counts along switching-ODE trajectories (VELOVI).
- :func:`simulate_batches` -- batches, cell types with unlabeled cells, a residual program, covariates (FADVI).
"""

from __future__ import annotations

from cellvi._lazy import lazy_exports

# public function -> module that defines it
_FUNCTIONS: dict[str, str] = {
    "simulate_spatial": "cellvi.data._spatial",
    "simulate_ambient": "cellvi.data._ambient",
    "simulate_velocity": "cellvi.data._velocity",
    "simulate_batches": "cellvi.data._batches",
}

__all__ = list(_FUNCTIONS)

__getattr__, __dir__ = lazy_exports(__name__, _FUNCTIONS)
