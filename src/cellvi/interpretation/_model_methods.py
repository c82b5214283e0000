"""The interpretation methods of :class:`cellvi.AMICI`, as plain functions of the model.

``AMICI`` delegates its ``get_attention_patterns``, ``get_counterfactual_attention_patterns``,
``get_expl_variance_scores`` and ``get_neighbor_ablation_scores`` methods to these functions, so the
interpretation code lives in :mod:`cellvi.interpretation` and the model class stays thin.
"""

from __future__ import annotations

from ._ablation import AMICIAblationModule
from ._attention import AMICIAttentionModule
from ._counterfactual import AMICICounterfactualAttentionModule
from ._explained_variance import AMICIExplainedVarianceModule


def get_attention_patterns(model, adata=None, indices=None, batch_size=None, flavor="vanilla", prog_bar=True):
    """Attention patterns of ``model``: :meth:`AMICIAttentionModule.compute`."""
    return AMICIAttentionModule.compute(model, adata=adata, indices=indices, batch_size=batch_size, flavor=flavor,
                                        prog_bar=prog_bar)


def get_counterfactual_attention_patterns(model, cell_type, adata=None, indices=None, head_idxs=None, batch_size=None,
                                          prog_bar=True):
    """Counterfactual attention of ``model``: :meth:`AMICICounterfactualAttentionModule.compute`."""
    return AMICICounterfactualAttentionModule.compute(model, cell_type, adata=adata, indices=indices,
                                                      head_idxs=head_idxs, batch_size=batch_size, prog_bar=prog_bar)


def get_expl_variance_scores(model, adata=None, alpha=0.05, run_permutation_test=True, n_permutations=None,
                             batch_size=None, random_state=0, prog_bar=True):
    """Explained variance per head and cell type: :meth:`AMICIExplainedVarianceModule.compute`."""
    return AMICIExplainedVarianceModule.compute(model, adata=adata, alpha=alpha,
                                                run_permutation_test=run_permutation_test,
                                                n_permutations=n_permutations, batch_size=batch_size,
                                                random_state=random_state, prog_bar=prog_bar)


def get_neighbor_ablation_scores(model, cell_type=None, head_idx=None, adata=None, ablated_neighbor_ct_sub=None,
                                 ablated_neighbor_indices=None, compute_z_value=False, batch_size=None, prog_bar=True):
    """Neighbour-ablation scores: :meth:`AMICIAblationModule.compute`."""
    return AMICIAblationModule.compute(model, cell_type=cell_type, head_idx=head_idx, adata=adata,
                                       ablated_neighbor_ct_sub=ablated_neighbor_ct_sub,
                                       ablated_neighbor_indices=ablated_neighbor_indices,
                                       compute_z_value=compute_z_value, batch_size=batch_size, prog_bar=prog_bar)
