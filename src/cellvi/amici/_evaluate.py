"""Small evaluation helpers shared by the AMICI demo, tests and benchmark (not public API)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._constants import AMICI_KEYS as KEYS


def heldout_errors(model, adata, indices) -> tuple[float, float]:
    """Mean per-cell ``0.5 * SSE`` of the model and of the cell-type-mean baseline on ``indices`` of ``adata``."""
    pred = model.get_predictions(adata, indices=indices, prog_bar=False)
    resid = model.get_predictions(adata, indices=indices, get_residuals=True, prog_bar=False)
    manager = model.get_anndata_manager(adata, required=True)
    X = manager.get_from_registry("X")[np.asarray(indices)]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    model_err = float(0.5 * ((X - pred) ** 2).sum(1).mean())
    base_err = float(0.5 * ((X - (pred - resid)) ** 2).sum(1).mean())
    return model_err, base_err


@torch.inference_mode()
def attention_by_sender_type(
    model, adata, receiver: str, labels_key: str, max_distance: float
) -> pd.DataFrame:
    """Mean attention of ``receiver`` cells to their neighbours within ``max_distance``, per head x neighbour type."""
    adata = model._validate_anndata(adata)
    manager = model.get_anndata_manager(adata, required=True)
    types = pd.Categorical(adata.obs[labels_key])
    cells = np.flatnonzero(np.asarray(types == receiver))
    model.module.eval()
    loader = model._make_data_loader(adata, cells, 512)
    att = np.concatenate(
        [model.module(t, compute_loss=False)[1][KEYS.ATTENTION][..., :-1].cpu().numpy() for t in loader]
    )  # (n, H, K)
    nn_idx = manager.get_from_registry(KEYS.NN_IDX)[cells]
    nn_dist = manager.get_from_registry(KEYS.NN_DIST)[cells]
    nn_type = np.asarray(types.codes)[nn_idx]
    near = nn_dist <= max_distance
    out = {}
    for c, name in enumerate(types.categories):
        sel = near & (nn_type == c)
        n_sel = int(sel.sum())
        out[name] = (att * sel[:, None, :]).sum((0, 2)) / n_sel if n_sel else np.full(att.shape[1], np.nan)
    return pd.DataFrame(out, index=pd.Index(range(att.shape[1]), name="head"))
