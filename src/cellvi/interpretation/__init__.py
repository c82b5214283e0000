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

Examples
--------
>>> import cellvi
>>> from cellvi.interpretation import AMICIAblationModule, AMICICounterfactualAttentionModule
>>> adata = cellvi.data.simulate_spatial(n_cells=400, n_genes=50, seed=0)
>>> cellvi.AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=10)
>>> model = cellvi.AMICI(adata, n_heads=2, n_head_size=8, n_nn_embed=32, n_nn_embed_hidden=32)
>>> model.train(max_epochs=2, enable_progress_bar=False)
>>> ablation = AMICIAblationModule.compute(model, compute_z_value=True, prog_bar=False)
>>> ablation.get_interaction_weight_matrix().shape  # senders x receivers
(4, 4)
>>> cf = AMICICounterfactualAttentionModule.compute(model, "A", prog_bar=False)
>>> list(cf.calculate_length_scales().columns)
['neighbor_idx', 'neighbor_label', 'head_idx', 'length_scale', 'filtered']
"""

from __future__ import annotations

from cellvi._lazy import lazy_exports

_NAMES: dict[str, str] = {
    "AMICIAttentionModule": "cellvi.interpretation._attention",
    "AMICICounterfactualAttentionModule": "cellvi.interpretation._counterfactual",
    "AMICIExplainedVarianceModule": "cellvi.interpretation._explained_variance",
    "AMICIAblationModule": "cellvi.interpretation._ablation",
}

__all__ = list(_NAMES) + ["stats"]

__getattr__, __dir__ = lazy_exports(__name__, _NAMES, {"stats": "cellvi.interpretation._stats"})
