"""Interpretation of a trained :class:`cellvi.AMICI` model.

- :class:`AMICIAttentionModule` -- attention patterns (four flavours), distance summaries and
  communication hubs.
- :class:`AMICICounterfactualAttentionModule` -- attention of single senders against the dummy key
  as a function of distance, and interaction length scales with bootstrap confidence intervals.
- :class:`AMICIExplainedVarianceModule` -- variance explained by each head per cell type, with a
  permutation test.
- :class:`AMICIAblationModule` -- neighbour-ablation scores, z-values, the sender x receiver
  interaction weight matrix and its plots.

Build them from the model (``model.get_attention_patterns()``, ``model.get_neighbor_ablation_scores()``,
...) or with ``<Module>.compute(model, ...)``. The statistics (Benjamini-Hochberg, permutation
p-values, bootstrap intervals, silhouette-chosen k-means) are in :mod:`cellvi.interpretation.stats`.
"""

from __future__ import annotations

from importlib import import_module

_NAMES: dict[str, str] = {
    "AMICIAttentionModule": "cellvi.interpretation._attention",
    "AMICICounterfactualAttentionModule": "cellvi.interpretation._counterfactual",
    "AMICIExplainedVarianceModule": "cellvi.interpretation._explained_variance",
    "AMICIAblationModule": "cellvi.interpretation._ablation",
}

__all__ = [*_NAMES, "stats"]


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(_NAMES[name]), name)
    if name == "stats":
        return import_module("cellvi.interpretation._stats")
    raise AttributeError(f"module 'cellvi.interpretation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
