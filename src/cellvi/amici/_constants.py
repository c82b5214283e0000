"""Keys of the minibatch tensors and of the module outputs of :class:`cellvi.AMICI`."""

from __future__ import annotations

from typing import NamedTuple


class _AmiciKeys(NamedTuple):
    # registered AnnData fields (minibatch keys)
    X: str = "X"
    LABELS: str = "labels"
    COORDS: str = "coordinates"
    NN_IDX: str = "nn_idx"
    NN_DIST: str = "nn_dist"
    # gathered by the neighbour data path
    NN_X: str = "nn_x"  # (B, K, G) neighbour expression (plain form)
    NN_X_UNIQUE: str = "nn_x_unique"  # (U, G) expression of the unique neighbour cells
    NN_INVERSE: str = "nn_inverse"  # (B, K) row of nn_x_unique for each neighbour slot
    INDICES: str = "_indices"  # (B,) row indices of the receivers (index loader output)
    # inference outputs
    QUERIES: str = "queries"
    LABEL_EMBED: str = "label_embed"
    TYPE_QUERIES: str = "type_queries"  # (C, H, D) queries of every cell type
    TYPE_LABEL_EMBED: str = "type_label_embed"  # (C, n_label_embed) embeddings of every cell type
    NN_EMBED: str = "nn_embed"
    KEYS: str = "keys"
    VALUES: str = "values"
    KV_HIDDEN: str = "kv_hidden"  # shared hidden layer of keys and values, (U, n_kv_dim)
    POS_HIDDEN: str = "pos_hidden"
    DROPOUT_KEEP: str = "dropout_keep"  # (B, K) neighbour-dropout mask of a training step
    # generative outputs
    ATTENTION: str = "attention"
    ATTENTION_SCORES: str = "attention_scores"
    BASE_SCORES: str = "base_scores"
    DISTANCE_COEF: str = "distance_coef"
    HEAD_RESIDUALS: str = "head_residuals"
    RESIDUAL: str = "residual"
    PREDICTION: str = "prediction"


AMICI_KEYS = _AmiciKeys()
