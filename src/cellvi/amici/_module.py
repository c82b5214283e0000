"""AMICI torch module: cross-attention from a receiver's cell type to its spatial neighbours' expression.

The module knows nothing of AnnData. For a minibatch of ``B`` receiver cells with ``K`` neighbours
each (the ``K`` nearest cells of *another* type), over ``G`` genes, ``C`` types and ``H`` heads:

* query: the receiver's type ``c`` -> embedding ``e_c`` -> MLP -> per-head query ``q_h`` (size ``n_head_size``);
  the query network runs once per step, on the ``C`` type embeddings (:meth:`AMICIModule.type_queries`);
* neighbour features, computed **once per unique neighbour cell** of the minibatch: expression ``x_j``
  -> ``nn_embed`` -> ``u_j`` -> per-head key ``k_hj`` and value ``v_hj``;
* distance-kernel coefficient ``beta_hj = softplus(f_h(u_j, e_c) + pos_coef_offset) > 0``; the first
  layer of ``f`` is split into a per-neighbour part and a per-type part, so only a LayerNorm and one
  small linear layer run, once per unique (neighbour cell, receiver type) pair of the minibatch;
* the keys and values are linear in the shared hidden layer ``h_j``, so training never forms them per
  neighbour: ``q_c . k_j = (W_k^T q_c) . h_j + q_c . b_k`` (the key projection applied to the C type
  queries) and ``sum_j a_hj v_hj = W_v,h (sum_j a_hj h_j) + b_v,h sum_j a_hj`` (the value projection
  applied after the attention sum, per receiver and head). The same numbers, 15-20% less work per step;
* attention score ``l_hj = q_h . k_hj / sqrt(n_head_size) - beta_hj * d_j / distance_kernel_unit_scale``,
  plus a dummy "no interaction" key with fixed score ``attention_dummy_score`` and value 0; softmax over the
  ``K + 1`` entries gives ``a_hj``;
* residual: ``r = b_c + sum_h W_h (sum_j a_hj v_hj)`` with ``W_h`` (``n_head_size`` -> ``G``) and a learned
  per-type offset ``b_c``; prediction ``mu_c + r`` where ``mu_c`` is the fixed cell-type mean profile
  (buffer ``ct_profiles``);
* loss: unit-variance Gaussian negative log-likelihood without constant, ``0.5 * sum_g (x_g - pred_g)^2``
  per cell on log-normalised expression, plus optional penalties (attention entropy, value L1).

Differences from ``amici-st`` 0.1.0 (same mathematics of attention, distance kernel and dummy key):
the residual is *additive over heads* (no LayerNorm after the attention output), so per-head and
per-neighbour contributions to the prediction are exact rather than heuristic; per-neighbour networks
run once per unique neighbour cell; the penalties are added to the training loss but are *not* part of
the reconstruction or ELBO metrics, so early stopping on ``elbo_validation`` is not inflated by the
penalty ramp.

Interpretation hooks
--------------------
These are stable entry points for :mod:`cellvi.interpretation` (plain PyTorch, no hook library):

(a) Forward / generative outputs. ``module(tensors)`` returns ``(inference_outputs, generative_outputs,
    loss_output)``; ``generative_outputs`` (and :meth:`AMICIModule.generative`) hold

    * ``"attention"``: (B, H, K+1) post-softmax weights, the dummy key **last** (index ``K``);
    * ``"attention_scores"``: (B, H, K+1) pre-softmax scores ``l_hj`` (removed neighbours are ``-inf``),
      the dummy score last;
    * ``"base_scores"``: (B, H, K) ``q.k / sqrt(d)`` without the distance term;
    * ``"distance_coef"``: (B, H, K) ``beta_hj``;
    * ``"head_residuals"``: (B, H, G) per-head value contributions ``W_h sum_j a_hj v_hj``;
      ``residual == type_offset[c] + head_residuals.sum(1)`` exactly;
    * ``"residual"``, ``"prediction"``: (B, G).
(b) Masking. ``neighbor_mask`` (B, K) bool, ``True`` = neighbour is attended, ``False`` = removed before the
    softmax (its score becomes ``-inf``; the remaining weights renormalise, the dummy is never removed).
    ``attention_scale`` (broadcastable to (B, H, K)) multiplies the *post-softmax* weights of the real
    neighbours without renormalising (the original's ablation: zero it for ablated neighbours or heads).
    Both are keyword arguments of :meth:`AMICIModule.generative` and can be passed as
    ``module(tensors, generative_kwargs={"neighbor_mask": m})`` or as ``tensors["neighbor_mask"]``.
(c) :meth:`AMICIModule.attention_scores` ``(labels, nn_x, nn_dist)`` -> dict of (B, H, K) ``scores``,
    ``base_scores``, ``distance_coef`` for receivers of given types against given neighbour expression at given
    distances (counterfactual distance curves: ``a(d) = sigmoid(base - coef * d / unit - dummy)`` for one
    sender against the dummy).
(d) :attr:`AMICIModule.dummy_score` (float), :attr:`AMICIModule.distance_kernel_unit_scale` (float),
    :meth:`AMICIModule.distance_coefficients` ``(labels, nn_x)`` -> (B, H, K) ``beta``.
(e) :meth:`AMICIModule.value_contributions` ``(x)`` -> (N, H, G): what each cell, as a neighbour, adds to the
    residual through head ``h`` at attention weight 1; ``"head_residuals"`` in (a) is its attention-weighted sum.
    :meth:`AMICIModule.embed_neighbors` ``(x)`` -> (N, n_nn_embed) neighbour embeddings.

The methods of (c)-(e) keep autograd on; wrap them in ``torch.inference_mode()`` when no gradient is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ._constants import AMICI_KEYS as KEYS


class _MLP(nn.Module):
    """``Linear -> LayerNorm -> ReLU -> Linear`` (optionally a final LayerNorm)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, final_norm: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, n_hidden),
            nn.LayerNorm(n_hidden),
            nn.ReLU(inplace=True),  # (in place on the LayerNorm output, which its backward does not read)
            nn.Linear(n_hidden, n_out),
            nn.LayerNorm(n_out) if final_norm else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _drop_unattended(
    nn_x: torch.Tensor, nn_inverse: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``nn_x`` (U, G) that some kept slot of ``nn_inverse`` (B, K) reads, and the renumbered index.

    Slots of removed rows (all of them dropped) point at row 0; nothing is removed when every row is read
    or when no slot is kept.
    """
    used = torch.zeros(nn_x.shape[0], dtype=torch.bool, device=nn_x.device)
    used[nn_inverse[keep]] = True
    n_used = int(used.sum())
    if n_used == nn_x.shape[0] or n_used == 0:
        return nn_x, nn_inverse
    rows = used.nonzero().squeeze(1)
    renumber = used.long().cumsum(0) - 1
    return nn_x.index_select(0, rows), renumber[nn_inverse].clamp_(min=0)


class AMICIModule(BaseModuleClass):
    """Torch module of :class:`cellvi.AMICI` (see the module docstring for the equations and hooks).

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_labels
        Number of cell types ``C``.
    ct_profiles
        (C, G) cell-type mean expression (a buffer, not learned, saved with the model).
    n_heads
        Number of attention heads ``H``.
    n_head_size
        Size of each head's query, key and value.
    n_label_embed
        Size of the cell-type embedding.
    n_query_dim
        Per-head query input size (before the per-head query projection).
    n_query_embed_hidden
        Hidden size of the query MLP.
    n_nn_embed
        Size of the neighbour embedding ``u_j``.
    n_nn_embed_hidden
        Hidden size of the neighbour-embedding MLP.
    n_kv_dim
        Hidden size shared by the key and value projections.
    n_pos_coef_mlp_hidden
        Hidden size of the distance-coefficient network.
    attention_dummy_score
        Fixed score of the dummy "no interaction" key.
    neighbor_dropout
        Probability of removing each (receiver, neighbour) pair from attention during training.
    attention_penalty_coef
        Weight of the attention-entropy penalty (changed during training by
        :class:`~cellvi.amici.AttentionPenaltyMonitor`).
    value_l1_penalty_coef
        Weight of the L1 penalty on the value vectors.
    pos_coef_offset
        Offset added before the softplus of the distance coefficient.
    distance_kernel_unit_scale
        Distances are divided by this before entering the kernel.
    """

    def __init__(
        self,
        n_genes: int,
        n_labels: int,
        ct_profiles: torch.Tensor,
        n_heads: int = 8,
        n_head_size: int = 32,
        n_label_embed: int = 32,
        n_query_dim: int = 128,
        n_query_embed_hidden: int = 512,
        n_nn_embed: int = 256,
        n_nn_embed_hidden: int = 512,
        n_kv_dim: int = 256,
        n_pos_coef_mlp_hidden: int = 128,
        attention_dummy_score: float = 3.0,
        neighbor_dropout: float = 0.1,
        attention_penalty_coef: float = 0.0,
        value_l1_penalty_coef: float = 0.0,
        pos_coef_offset: float = -2.0,
        distance_kernel_unit_scale: float = 1.0,
    ):
        super().__init__()
        self.n_genes = n_genes
        self.n_labels = n_labels
        self.n_heads = n_heads
        self.n_head_size = n_head_size
        self.n_query_dim = n_query_dim
        self.neighbor_dropout = float(neighbor_dropout)
        self.attention_penalty_coef = float(attention_penalty_coef)
        self.value_l1_penalty_coef = float(value_l1_penalty_coef)
        self.pos_coef_offset = float(pos_coef_offset)
        self._dummy_score = float(attention_dummy_score)
        self._unit_scale = float(distance_kernel_unit_scale)

        profiles = torch.as_tensor(ct_profiles, dtype=torch.float32).reshape(n_labels, n_genes)
        self.register_buffer("ct_profiles", profiles.clone())

        H, D = n_heads, n_head_size
        self.ct_embed = nn.Embedding(n_labels, n_label_embed)
        self.query_embed = _MLP(n_label_embed, n_query_embed_hidden, H * n_query_dim)
        self.query_proj = nn.Parameter(torch.empty(H, n_query_dim, D))
        self.query_bias = nn.Parameter(torch.zeros(H, D))
        self.nn_embed = _MLP(n_genes, n_nn_embed_hidden, n_nn_embed)
        self.kv_hidden = nn.Sequential(nn.Linear(n_nn_embed, n_kv_dim), nn.LayerNorm(n_kv_dim), nn.ReLU())
        self.key_proj = nn.Linear(n_kv_dim, H * D)
        self.value_proj = nn.Linear(n_kv_dim, H * D)
        # distance coefficient: f(u_j, e_c) = W2 relu(LN(A u_j + B e_c + b))
        self.pos_nn = nn.Linear(n_nn_embed, n_pos_coef_mlp_hidden)
        self.pos_label = nn.Linear(n_label_embed, n_pos_coef_mlp_hidden, bias=False)
        self.pos_norm = nn.LayerNorm(n_pos_coef_mlp_hidden)
        self.pos_out = nn.Linear(n_pos_coef_mlp_hidden, H)
        # additive read-out: per-head (D -> G) maps and a per-type offset
        self.head_out = nn.Parameter(torch.empty(H, D, n_genes))
        self.type_offset = nn.Parameter(torch.zeros(n_labels, n_genes))
        nn.init.uniform_(self.query_proj, -1 / math.sqrt(n_query_dim), 1 / math.sqrt(n_query_dim))
        nn.init.uniform_(self.head_out, -1 / math.sqrt(H * D), 1 / math.sqrt(H * D))
        nn.init.zeros_(self.pos_out.weight)
        nn.init.zeros_(self.pos_out.bias)

    # ------------------------------------------------------------------ hooks (d)
    @property
    def dummy_score(self) -> float:
        """Fixed pre-softmax score of the dummy "no interaction" key."""
        return self._dummy_score

    @property
    def distance_kernel_unit_scale(self) -> float:
        """Distances are divided by this inside the kernel (``l = s - beta * d / unit``)."""
        return self._unit_scale

    # ------------------------------------------------------------------ building blocks
    def type_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (C, H, D) and label embeddings (C, n_label_embed) of every cell type."""
        e = self.ct_embed.weight
        qin = self.query_embed(e).view(-1, self.n_heads, self.n_query_dim)
        q = torch.einsum("bhi,hid->bhd", qin, self.query_proj) + self.query_bias
        return q, e

    def queries(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (B, H, D) and label embeddings (B, n_label_embed) of receiver types (B,)."""
        q, e = self.type_queries()
        return q[labels], e[labels]

    def embed_neighbors(self, x: torch.Tensor) -> torch.Tensor:
        """Neighbour embeddings ``u`` (N, n_nn_embed) of expression ``x`` (N, G)."""
        return self.nn_embed(x)

    def neighbor_features(self, x: torch.Tensor, keys_values: bool = True) -> dict[str, torch.Tensor]:
        """Per-cell neighbour features of expression ``x`` (N, G).

        Embedding ``u``, the shared key/value hidden layer, the per-neighbour part of the distance-kernel
        network and (``keys_values=True``) the keys and values (N, H, D). Training does not need the keys and
        values themselves: the attention uses them only through ``q . k`` and ``sum_j a_j v_j``, which are
        computed from the hidden layer with the projections applied once per type and per receiver.
        """
        u = self.nn_embed(x)
        # the key/value hidden layer and the kernel network both read u: one matrix product
        n_kv = self.kv_hidden[0].out_features
        w = torch.cat([self.kv_hidden[0].weight, self.pos_nn.weight])
        bias = torch.cat([self.kv_hidden[0].bias, self.pos_nn.bias])
        kv, pos = torch.split(F.linear(u, w, bias), [n_kv, w.shape[0] - n_kv], dim=1)
        h = F.relu(self.kv_hidden[1](kv), inplace=True)
        out = {KEYS.NN_EMBED: u, KEYS.KV_HIDDEN: h, KEYS.POS_HIDDEN: pos}
        if keys_values:
            shape = (-1, self.n_heads, self.n_head_size)
            out[KEYS.KEYS] = self.key_proj(h).view(shape)
            out[KEYS.VALUES] = self.value_proj(h).view(shape)
        return out

    def _pair_terms(self, kv_hidden, pos_hidden, nn_inverse, labels, type_queries=None, dropout_keep=None):
        """Base scores and distance coefficients (B, H, K) from per-cell features gathered by ``nn_inverse``.

        ``q_c . k_j = (W_k^T q_c) . h_j + q_c . b_k``: the key projection is applied to the C type queries
        instead of the U neighbour cells. The distance coefficient depends only on the neighbour cell and the
        receiver's *type*, so its network runs once per unique (neighbour cell, receiver type) pair.
        ``type_queries``: the output of :meth:`type_queries` when already computed (else computed here).
        ``dropout_keep`` (B, K): slots removed by neighbour dropout take the coefficient of a kept slot (they
        are removed from the softmax), so pairs with no kept slot are not computed.
        """
        n_types, H, D = self.n_labels, self.n_heads, self.n_head_size
        q_types, e_types = self.type_queries() if type_queries is None else type_queries  # (C, H, D), (C, E)
        wk = self.key_proj.weight.view(H, D, -1)  # (H, D, n_kv)
        q_kv = torch.einsum("chd,hdn->chn", q_types, wk).reshape(n_types * H, -1)
        q_b = (q_types * self.key_proj.bias.view(H, D)).sum(-1).reshape(-1)  # (C * H,)
        scores = torch.addmm(q_b, kv_hidden, q_kv.t()).view(-1, n_types, H) / math.sqrt(D)  # (U, C, H)
        base = scores[nn_inverse, labels[:, None]]  # (B, K, H)
        pair = nn_inverse * n_types + labels[:, None]
        if dropout_keep is not None:
            kept = pair[dropout_keep]
            if kept.numel():
                pair = torch.where(dropout_keep, pair, kept[:1])
        uniq, pair_inverse = torch.unique(pair, return_inverse=True)
        cell, ctype = uniq // n_types, uniq % n_types
        pos = pos_hidden.index_select(0, cell) + self.pos_label(e_types).index_select(0, ctype)
        coef = F.softplus(
            self.pos_out(F.relu(self.pos_norm(pos), inplace=True)) + self.pos_coef_offset
        )  # (M, H)
        return base.permute(0, 2, 1), coef[pair_inverse].permute(0, 2, 1)

    @staticmethod
    def _flatten_neighbors(nn_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, g = nn_x.shape
        inverse = torch.arange(b * k, device=nn_x.device).view(b, k)
        return nn_x.reshape(b * k, g), inverse

    # ------------------------------------------------------------------ hooks (c), (d), (e)
    def attention_scores(
        self, labels: torch.Tensor, nn_x: torch.Tensor, nn_dist: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Pre-softmax attention scores of receivers of given types against given neighbours at given distances.

        Parameters
        ----------
        labels
            (B,) or (B, 1) receiver cell-type codes.
        nn_x
            (B, K, G) neighbour expression (as registered: log-normalised).
        nn_dist
            (B, K) distances (coordinate units).

        Returns
        -------
        dict with (B, H, K) tensors ``"scores"`` (``base - coef * d / unit``), ``"base_scores"`` and
        ``"distance_coef"``; the dummy score is :attr:`dummy_score`.
        """
        labels = labels.reshape(-1).long()
        flat, inverse = self._flatten_neighbors(nn_x)
        feats = self.neighbor_features(flat, keys_values=False)
        base, coef = self._pair_terms(feats[KEYS.KV_HIDDEN], feats[KEYS.POS_HIDDEN], inverse, labels)
        scores = base - coef * nn_dist[:, None, :] / self._unit_scale
        return {"scores": scores, "base_scores": base, "distance_coef": coef}

    def distance_coefficients(self, labels: torch.Tensor, nn_x: torch.Tensor) -> torch.Tensor:
        """Per-head distance-kernel coefficients ``beta`` (B, H, K) for receiver types (B,) and neighbours (B, K, G)."""
        labels = labels.reshape(-1).long()
        flat, inverse = self._flatten_neighbors(nn_x)
        feats = self.neighbor_features(flat, keys_values=False)
        return self._pair_terms(feats[KEYS.KV_HIDDEN], feats[KEYS.POS_HIDDEN], inverse, labels)[1]

    def value_contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Residual (N, H, G) that each cell ``x`` (N, G), as a neighbour, adds through head ``h`` at attention 1."""
        values = self.neighbor_features(x)[KEYS.VALUES]  # (N, H, D)
        return torch.einsum("nhd,hdg->nhg", values, self.head_out)

    # ------------------------------------------------------------------ scvi-tools module API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        if KEYS.NN_X_UNIQUE in tensors:
            nn_x, inverse = tensors[KEYS.NN_X_UNIQUE], tensors[KEYS.NN_INVERSE]
        else:
            nn_x, inverse = self._flatten_neighbors(tensors[KEYS.NN_X])
        return {"labels": tensors[KEYS.LABELS], "nn_x": nn_x, "nn_inverse": inverse}

    @auto_move_data
    def inference(self, labels: torch.Tensor, nn_x: torch.Tensor, nn_inverse: torch.Tensor) -> dict:
        """Receiver queries and per-unique-neighbour features.

        ``nn_x`` (U, G) holds the expression of the U unique neighbour cells of the minibatch and
        ``nn_inverse`` (B, K) the row of ``nn_x`` for each (receiver, neighbour) slot. The keys and values
        (U, H, D) are part of the output in eval mode (for the hooks) and when the value-L1 penalty is on;
        training otherwise reads the neighbours through their key/value hidden layer only.

        In training, the neighbour-dropout mask (B, K) is drawn here (output ``"dropout_keep"``, applied by
        :meth:`generative`) and, unless the value-L1 penalty needs every slot's values, neighbour cells
        whose slots are all dropped are left out of ``nn_x`` (about 5% of the rows at the default 0.1) and
        ``nn_inverse`` is renumbered; their slots point at another row and carry no attention.
        """
        labels = labels.reshape(-1).long()
        q_types, e_types = self.type_queries()
        keep = None
        if self.training and self.neighbor_dropout > 0:
            keep = torch.rand(nn_inverse.shape, device=nn_x.device) >= self.neighbor_dropout
            if self.value_l1_penalty_coef <= 0:
                nn_x, nn_inverse = _drop_unattended(nn_x, nn_inverse, keep)
        out = self.neighbor_features(nn_x, keys_values=not self.training or self.value_l1_penalty_coef > 0)
        out.update(
            {KEYS.QUERIES: q_types[labels], KEYS.LABEL_EMBED: e_types[labels], KEYS.NN_INVERSE: nn_inverse}
        )
        out.update({KEYS.TYPE_QUERIES: q_types, KEYS.TYPE_LABEL_EMBED: e_types})
        if keep is not None:
            out[KEYS.DROPOUT_KEEP] = keep
        return out

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        gen = {
            "labels": tensors[KEYS.LABELS],
            "nn_dist": tensors[KEYS.NN_DIST],
            "queries": inference_outputs[KEYS.QUERIES],
            "label_embed": inference_outputs[KEYS.LABEL_EMBED],
            "kv_hidden": inference_outputs[KEYS.KV_HIDDEN],
            "pos_hidden": inference_outputs[KEYS.POS_HIDDEN],
            "nn_inverse": inference_outputs[KEYS.NN_INVERSE],
        }
        if KEYS.TYPE_QUERIES in inference_outputs:
            gen["type_queries"] = (
                inference_outputs[KEYS.TYPE_QUERIES],
                inference_outputs[KEYS.TYPE_LABEL_EMBED],
            )
        if KEYS.DROPOUT_KEEP in inference_outputs:
            gen["dropout_keep"] = inference_outputs[KEYS.DROPOUT_KEEP]
        for key in ("neighbor_mask", "attention_scale"):
            if key in tensors:
                gen[key] = tensors[key]
        return gen

    @auto_move_data
    def generative(
        self,
        labels: torch.Tensor,
        nn_dist: torch.Tensor,
        queries: torch.Tensor,
        label_embed: torch.Tensor,
        kv_hidden: torch.Tensor,
        pos_hidden: torch.Tensor,
        nn_inverse: torch.Tensor,
        neighbor_mask: torch.Tensor | None = None,
        attention_scale: torch.Tensor | None = None,
        type_queries: tuple[torch.Tensor, torch.Tensor] | None = None,
        dropout_keep: torch.Tensor | None = None,
    ) -> dict:
        """Attention over the K neighbours plus the dummy key, and the predicted expression.

        Parameters
        ----------
        labels
            (B,) or (B, 1) receiver cell types.
        nn_dist
            (B, K) neighbour distances.
        queries, label_embed
            The receivers' queries (B, H, D) and label embeddings (B, n_label_embed) from :meth:`inference`.
            They depend on the type only; the computation uses the per-type values of
            :meth:`type_queries`, which they equal (they are inputs so that hooks can replicate receivers).
        kv_hidden, pos_hidden
            Per-unique-neighbour key/value hidden layer (U, n_kv_dim) and kernel-network part (U, n_hidden).
        nn_inverse
            (B, K) row of the unique-neighbour tensors for each (receiver, neighbour) slot.
        neighbor_mask
            (B, K) bool; ``False`` removes the neighbour from attention before the softmax.
        attention_scale
            Tensor broadcastable to (B, H, K) multiplying the post-softmax weights of the real neighbours
            (no renormalisation).
        type_queries
            ``(queries (C, H, D), label embeddings (C, n_label_embed))`` of every type, as returned by
            :meth:`type_queries`; :meth:`inference` passes its own so that the query network runs once per
            step (computed here when None).
        dropout_keep
            (B, K) bool neighbour-dropout mask drawn by :meth:`inference` (training only; drawn here when None).
            The ``base_scores`` and ``distance_coef`` of dropped slots are then those of another slot.

        Returns
        -------
        dict with ``attention``, ``attention_scores`` (B, H, K+1; dummy last), ``base_scores``,
        ``distance_coef`` (B, H, K), ``head_residuals`` (B, H, G), ``residual`` and ``prediction`` (B, G).
        """
        labels = labels.reshape(-1).long()
        keep = None
        if self.training and self.neighbor_dropout > 0:
            keep = dropout_keep
            if keep is None:
                keep = torch.rand(nn_inverse.shape, device=kv_hidden.device) >= self.neighbor_dropout
        base, coef = self._pair_terms(kv_hidden, pos_hidden, nn_inverse, labels, type_queries, keep)
        scores = base - coef * nn_dist[:, None, :].to(base.dtype) / self._unit_scale
        if neighbor_mask is not None:
            nm = neighbor_mask.to(device=scores.device, dtype=torch.bool)
            keep = nm if keep is None else keep & nm
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        dummy = scores.new_full((*scores.shape[:2], 1), self._dummy_score)
        all_scores = torch.cat([scores, dummy], dim=-1)
        attention = torch.softmax(all_scores, dim=-1)
        weights = attention[..., :-1]
        if attention_scale is not None:
            weights = weights * attention_scale.to(weights)
        # sum_j a_hj v_hj = W_v,h (sum_j a_hj h_j) + b_v,h sum_j a_hj: the value projection runs per receiver
        # and head instead of per neighbour cell
        H, D = self.n_heads, self.n_head_size
        mixed = torch.bmm(weights, kv_hidden[nn_inverse])  # (B, H, n_kv)
        z = torch.einsum("bhn,hdn->bhd", mixed, self.value_proj.weight.view(H, D, -1))
        z = z + weights.sum(-1, keepdim=True) * self.value_proj.bias.view(H, D)
        head_residuals = torch.einsum("bhd,hdg->bhg", z, self.head_out)
        residual = self.type_offset[labels] + head_residuals.sum(1)
        prediction = self.ct_profiles[labels] + residual
        return {
            KEYS.ATTENTION: attention,
            KEYS.ATTENTION_SCORES: all_scores,
            KEYS.BASE_SCORES: base,
            KEYS.DISTANCE_COEF: coef,
            KEYS.HEAD_RESIDUALS: head_residuals,
            KEYS.RESIDUAL: residual,
            KEYS.PREDICTION: prediction,
        }

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict, **kwargs) -> LossOutput:
        """Unit-variance Gaussian NLL (``0.5 * SSE`` per cell) plus the attention-entropy and value-L1 penalties.

        ``reconstruction_loss`` (and so the ELBO metrics and early stopping) holds only the Gaussian term;
        the penalties are added to ``loss`` and logged as extra metrics.
        """
        x = tensors[KEYS.X].to(generative_outputs[KEYS.PREDICTION].dtype)
        recon = 0.5 * (x - generative_outputs[KEYS.PREDICTION]).pow(2).sum(-1)
        total = recon
        extra = {}
        if self.attention_penalty_coef > 0:
            a = generative_outputs[KEYS.ATTENTION]
            entropy = -(a * a.clamp(1e-6, 1 - 1e-6).log()).sum(-1).mean(-1)  # (B,)
            total = total + self.attention_penalty_coef * entropy
            extra["attention_penalty"] = (self.attention_penalty_coef * entropy).mean().detach()
        if self.value_l1_penalty_coef > 0:
            per_cell = inference_outputs[KEYS.VALUES].abs().sum((-1, -2))  # (U,)
            l1 = per_cell[inference_outputs[KEYS.NN_INVERSE]].mean(-1)  # (B,)
            total = total + self.value_l1_penalty_coef * l1
            extra["value_l1_penalty"] = (self.value_l1_penalty_coef * l1).mean().detach()
        extra["attention_penalty_coef"] = recon.new_tensor(self.attention_penalty_coef)
        return LossOutput(loss=total.mean(), reconstruction_loss=recon, extra_metrics=extra)
