"""Neighbour ablation: how much each sender cell type contributes to the prediction of each receiver type."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ._access import ModelData, eval_mode
from ._plotting import finish_figure, new_figure, palette_for
from ._stats import StreamingCorrelation, bh_adjust_nl10, correlation_to_z, z_to_nl10_pvalue

INDICES_GROUP = "ablated_indices"
_SCORES = ("ablation", "diff", "z_value", "nl10_pval", "nl10_pval_adj")


class AMICIAblationModule:
    """Neighbour-ablation scores of a trained AMICI model (build it with :meth:`compute`).

    For the receivers of a cell type ``r``, the attention to the neighbours of sender type ``s`` is set
    to 0 *after* the softmax, without renormalising (the dummy keeps its weight), and the prediction
    is recomputed. With ``R0 = pred - x`` the residuals of the full model and ``R_s`` those of the
    ablated one, per gene ``g``:

    * ``{s}_ablation = mean_i(R_s^2 - R0^2)``: how much the squared error rises without the senders;
    * ``{s}_diff = mean_i(pred_full - pred_ablated)``: the signed contribution of the senders;
    * ``{s}_z_value`` (with ``compute_z_value``): ``z = r sqrt(n-2) / sqrt(1-r^2)`` with
      ``r = corr_i(|pred_full - pred_ablated|, x)``; its sign is the direction of the effect the data
      support (positive: cells the senders change most express the gene more);
    * ``{s}_nl10_pval`` and ``{s}_nl10_pval_adj``: ``-log10`` of the two-sided normal p-value of ``z``
      and of its Benjamini-Hochberg adjustment over the genes of the (receiver, sender) pair.

    Rows: one per (receiver type, gene), with ``gene_variance``, ``gene``, ``head_idx`` (``<NA>`` = all
    heads) and ``cell_type`` (the receiver). All ablations of a receiver type run in one batched pass.

    Differences from ``amici-st`` 0.1.0: p-values are two-sided and exact in the tail (the original's
    one-sided ``1 - Phi(z)`` ignores down-regulation and adds ``1e-8``); the z-values are computed
    from streamed sums (no per-gene loop); the sender x receiver weight counts significant genes in
    both directions by default (``direction="up"`` gives the original count).
    """

    def __init__(
        self,
        _adata=None,
        _labels_key=None,
        _ablation_scores_df: pd.DataFrame | None = None,
        _compute_kwargs: dict | None = None,
        _cell_types=None,
    ):
        self._adata = _adata
        self._labels_key = _labels_key
        self._ablation_scores_df = _ablation_scores_df
        self._compute_kwargs = _compute_kwargs or {}
        self._cell_types = list(_cell_types) if _cell_types is not None else []

    # ------------------------------------------------------------------ compute
    @classmethod
    def compute(
        cls,
        model,
        cell_type: str | None = None,
        head_idx: int | None = None,
        adata=None,
        ablated_neighbor_ct_sub: list[str] | None = None,
        ablated_neighbor_indices: list[int] | None = None,
        compute_z_value: bool = False,
        *,
        batch_size: int | None = None,
        prog_bar: bool = True,
    ) -> AMICIAblationModule:
        """Difference in gene expression prediction error for cell type of interest when ablating neighbor cell types for a specific head of interest.

        Parameters
        ----------
        model
            A trained :class:`cellvi.AMICI`.
        cell_type
            The cell type to compute the residuals for. None indicates using all cell types.
        head_idx
            The index of the head to test. None indicates using all heads.
        adata
            The AnnData object (set up with ``AMICI.setup_anndata``; ``None``: the model's).
        ablated_neighbor_ct_sub
            The neighbor cell types to ablate (default: every cell type).
        ablated_neighbor_indices
            The indices of the neighbor cells to ablate (positions in ``adata``, or obs names); scored
            as one group named ``"ablated_indices"``. Not together with ``ablated_neighbor_ct_sub``.
        compute_z_value
            Whether to save the z-value using the correlation coefficient or not.
        batch_size
            Receivers per batched pass (``None``: ``scvi.settings.batch_size``).
        prog_bar
            Whether to show a progress bar.

        Returns
        -------
        :class:`AMICIAblationModule` with the scores in ``_ablation_scores_df`` (see the class docstring).
        """
        if ablated_neighbor_ct_sub is not None and ablated_neighbor_indices is not None:
            raise ValueError("Pass either ablated_neighbor_ct_sub or ablated_neighbor_indices, not both.")
        data = ModelData(model, adata)
        receivers = list(range(data.n_labels)) if cell_type is None else [data.code_of(cell_type)]
        heads = None if head_idx is None else data.head_list([head_idx], "head_idx")
        bs = data.batch_size(batch_size)
        dev = data.device
        if ablated_neighbor_indices is not None:
            member = torch.zeros(len(data.obs_names), dtype=torch.bool)
            member[torch.as_tensor(_positions(ablated_neighbor_indices, data.obs_names))] = True
            member = member.to(dev)
            groups = [INDICES_GROUP]
        else:
            codes = (
                list(range(data.n_labels))
                if ablated_neighbor_ct_sub is None
                else data.codes_of(ablated_neighbor_ct_sub, "ablated_neighbor_ct_sub")
            )
            groups = [data.categories[c] for c in codes]
            group_codes = torch.as_tensor(codes, device=dev)
        n_groups = len(groups)
        readout = _head_readout(data)
        frames = []
        with eval_mode(data.module):
            for r in receivers:
                rec = np.flatnonzero(data.labels == r)
                if len(rec) == 0:
                    continue
                acc = _Accumulator(n_groups, data.store.n_genes, dev, compute_z_value)
                desc = f"ablation: receivers {data.categories[r]}"
                for batch in data.batches(data.spatial_order(rec), bs, prog_bar, desc):
                    nn_idx = batch[data.keys.NN_IDX]  # (B, K)
                    if ablated_neighbor_indices is not None:
                        ablated = member[nn_idx][None]  # (1, B, K)
                    else:
                        nn_lab = data.store.labels[nn_idx]
                        ablated = nn_lab[None] == group_codes[:, None, None]  # (S, B, K)
                    full, delta = _ablated_predictions(data, batch, ablated, heads, readout)
                    acc.update(full, delta, batch[data.keys.X].to(full.dtype))
                frames.append(acc.frame(groups, data, r, head_idx))
        df = pd.concat(frames, ignore_index=True) if frames else _empty_frame(groups, compute_z_value)
        kwargs = {
            "cell_type": cell_type,
            "head_idx": head_idx,
            "ablated_neighbor_ct_sub": ablated_neighbor_ct_sub,
            "ablated_neighbor_indices": None if ablated_neighbor_indices is None else list(ablated_neighbor_indices),
            "compute_z_value": compute_z_value,
        }
        return cls(data.adata, _labels_key=data.labels_key, _ablation_scores_df=df, _compute_kwargs=kwargs, _cell_types=data.categories)

    # ------------------------------------------------------------------ accessors
    @property
    def ablation_scores(self) -> pd.DataFrame:
        """The scores (a copy of ``_ablation_scores_df``)."""
        return self._ablation_scores_df.copy()

    @property
    def sender_groups(self) -> list[str]:
        """Names of the ablated sender groups (column prefixes)."""
        cols = [c[: -len("_diff")] for c in self._ablation_scores_df.columns if c.endswith("_diff")]
        return cols

    def save(self, save_path) -> None:
        """Save the ablation scores to a CSV file (written atomically)."""
        from cellvi._io import atomic_path

        with atomic_path(save_path) as tmp:
            self._ablation_scores_df.to_csv(tmp, index=False)

    def _receiver_frame(self, cell_type) -> pd.DataFrame:
        df = self._ablation_scores_df
        if cell_type is None:
            present = df["cell_type"].unique()
            if len(present) != 1:
                raise ValueError(f"cell_type is required: the scores hold several receiver types {list(present)}.")
            cell_type = present[0]
        sub = df[df["cell_type"] == cell_type]
        if sub.empty:
            raise ValueError(f"cell_type={cell_type!r} has no ablation scores; computed for {list(df['cell_type'].unique())}.")
        return sub.set_index("gene")

    def _require_z(self, what: str) -> None:
        if not self._compute_kwargs.get("compute_z_value", False):
            raise ValueError(f"{what} needs z-values: compute the scores with compute_z_value=True.")

    # ------------------------------------------------------------------ interaction weights
    def get_interaction_weight_matrix(
        self, significance_threshold: float = 0.05, direction: str = "both", weight: str = "count"
    ) -> pd.DataFrame:
        """Sender x receiver interaction weights from the significant genes of each (receiver, sender) pair.

        A gene of the receiver type is significant for a sender when its adjusted p-value is below
        ``significance_threshold`` and its z-value and ``diff`` agree in sign (``direction="both"``),
        are both positive (``"up"``, the original's rule) or both negative (``"down"``).

        Parameters
        ----------
        significance_threshold
            Level of the Benjamini-Hochberg adjusted p-values.
        direction
            ``"both"``, ``"up"`` or ``"down"``.
        weight
            ``"count"``: the number of significant genes (the original's weight; with many receivers,
            tiny effects are significant too); ``"ablation"``: the sum over significant genes of the
            positive ``ablation`` scores, i.e. how much squared error the sender type explains.

        Returns
        -------
        :class:`pandas.DataFrame` indexed by sender, one column per receiver type (int64 counts or
        float64 ablation sums).
        """
        if weight not in ("count", "ablation"):
            raise ValueError(f"weight must be 'count' or 'ablation', got {weight!r}.")
        self._require_z("The interaction weight matrix")
        if not 0 < significance_threshold < 1:
            raise ValueError(f"significance_threshold must be a number in (0, 1), got {significance_threshold!r}.")
        if direction not in ("both", "up", "down"):
            raise ValueError(f"direction must be 'both', 'up' or 'down', got {direction!r}.")
        df = self._ablation_scores_df
        thr = -math.log10(significance_threshold)
        senders = self.sender_groups
        receivers = [c for c in self._cell_types if c in set(df["cell_type"])] or list(df["cell_type"].unique())
        codes = pd.Categorical(df["cell_type"], categories=receivers).codes
        W = np.zeros((len(senders), len(receivers)), dtype=np.int64 if weight == "count" else np.float64)
        for i, s in enumerate(senders):
            sig = df[f"{s}_nl10_pval_adj"].to_numpy() > thr
            z, d = df[f"{s}_z_value"].to_numpy(), df[f"{s}_diff"].to_numpy()
            if direction == "both":
                ok = sig & (np.sign(z) == np.sign(d)) & (d != 0)
            elif direction == "up":
                ok = sig & (z > 0) & (d > 0)
            else:
                ok = sig & (z < 0) & (d < 0)
            sel = ok & (codes >= 0)
            if weight == "count":
                W[i] = np.bincount(codes[sel], minlength=len(receivers))
            else:
                gain = np.clip(df[f"{s}_ablation"].to_numpy(), 0, None)
                W[i] = np.bincount(codes[sel], weights=gain[sel], minlength=len(receivers))
        return pd.DataFrame(W, index=pd.Index(senders, name="sender"), columns=pd.Index(receivers, name="receiver"))

    _get_interaction_weight_matrix = get_interaction_weight_matrix

    # ------------------------------------------------------------------ plots
    def plot_neighbor_ablation_scores(
        self,
        cell_type=None,
        score_col: str = "ablation",
        palette=None,
        threshold: float = 0.02,
        wandb_log: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Bar plot, per sender type, of the sum over genes of ``{sender}_{score_col}`` above ``threshold``.

        Returns
        -------
        The :class:`matplotlib.figure.Figure`.
        """
        sub = self._receiver_frame(cell_type)
        _check_score_col(score_col, sub, self.sender_groups)
        senders = self.sender_groups
        vals = np.array([sub[f"{s}_{score_col}"].where(sub[f"{s}_{score_col}"] > threshold, 0).sum() for s in senders])
        fig, ax = new_figure(1, 1, width=max(4, 0.6 * len(senders) + 2))
        colours = palette_for(senders, palette)
        ax[0, 0].bar(senders, vals, color=[colours[s] for s in senders])
        rec = sub["cell_type"].iloc[0]
        ax[0, 0].set(xlabel="ablated sender type", ylabel=f"sum of {score_col} > {threshold}", title=f"receiver {rec}")
        return finish_figure(fig, f"neighbor_ablation_{rec}_{score_col}", show=show, save_png=save_png,
                             save_svg=save_svg, save_dir=save_dir, wandb_log=wandb_log)

    def _top_gene_matrix(self, sub, value_col, sort_col, n_top_genes, positive_only=False):
        senders = self.sender_groups
        genes = []
        for s in senders:
            key = sub[f"{s}_{sort_col}"]
            if positive_only:
                key = key[sub[f"{s}_diff"] > 0]
            genes.extend(key.sort_values(ascending=False).index[:n_top_genes])
        genes = list(dict.fromkeys(genes))
        return pd.DataFrame({s: sub.loc[genes, f"{s}_{value_col}"].to_numpy() for s in senders}, index=genes).T

    def plot_featurewise_ablation_heatmap(
        self,
        cell_type=None,
        score_col: str = "ablation",
        n_top_genes: int = 10,
        wandb_log: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Heatmap (senders x genes) of ``score_col`` for the ``n_top_genes`` top genes of each sender."""
        import seaborn as sns

        sub = self._receiver_frame(cell_type)
        _check_score_col(score_col, sub, self.sender_groups)
        mat = self._top_gene_matrix(sub, score_col, score_col, n_top_genes)
        fig, ax = new_figure(1, 1, width=max(5, 0.35 * mat.shape[1] + 2), height=max(2.5, 0.45 * mat.shape[0] + 1.5))
        sns.heatmap(mat, ax=ax[0, 0], cmap="viridis", cbar_kws={"label": score_col})
        rec = sub["cell_type"].iloc[0]
        ax[0, 0].set(xlabel="gene", ylabel="ablated sender type", title=f"receiver {rec}: {score_col}")
        return finish_figure(fig, f"featurewise_ablation_{rec}_{score_col}", show=show, save_png=save_png,
                             save_svg=save_svg, save_dir=save_dir, wandb_log=wandb_log)

    def plot_featurewise_contributions_heatmap(
        self,
        cell_type=None,
        sort_by: str = "ablation",
        n_top_genes: int = 10,
        wandb_log: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Heatmap (senders x genes) of the signed contributions ``diff``, genes chosen by ``sort_by``."""
        import seaborn as sns

        sub = self._receiver_frame(cell_type)
        _check_score_col(sort_by, sub, self.sender_groups)
        mat = self._top_gene_matrix(sub, "diff", sort_by, n_top_genes)
        lim = float(np.nanmax(np.abs(mat.to_numpy()))) if mat.size else 1.0
        fig, ax = new_figure(1, 1, width=max(5, 0.35 * mat.shape[1] + 2), height=max(2.5, 0.45 * mat.shape[0] + 1.5))
        sns.heatmap(mat, ax=ax[0, 0], cmap="RdBu_r", vmin=-lim, vmax=lim, center=0, cbar_kws={"label": "diff"})
        rec = sub["cell_type"].iloc[0]
        ax[0, 0].set(xlabel="gene", ylabel="ablated sender type", title=f"receiver {rec}: contributions")
        return finish_figure(fig, f"featurewise_contributions_{rec}", show=show, save_png=save_png,
                             save_svg=save_svg, save_dir=save_dir, wandb_log=wandb_log)

    def plot_featurewise_contributions_dotplot(
        self,
        cell_type=None,
        color_by: str = "diff",
        size_by: str = "nl10_pval_adj",
        n_top_genes: int = 10,
        dot_max: float = 200,
        dot_min: float = 0,
        step: int = 5,
        min_size_by: float = 0,
        vrange: float = 0.5,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Dot plot (senders x genes): colour ``color_by`` (clipped to ``+-vrange``), size ``size_by``.

        Genes: for each sender the ``n_top_genes`` with the largest ``size_by`` among those with
        ``size_by > min_size_by``. Dot areas scale linearly from ``dot_min`` to ``dot_max``; the size legend
        shows ``step`` levels.
        """
        sub = self._receiver_frame(cell_type)
        senders = self.sender_groups
        _check_score_col(color_by, sub, senders)
        _check_score_col(size_by, sub, senders)
        genes = []
        for s in senders:
            key = sub[f"{s}_{size_by}"]
            genes.extend(key[key > min_size_by].sort_values(ascending=False).index[:n_top_genes])
        genes = list(dict.fromkeys(genes))
        colour = np.array([[sub.at[g, f"{s}_{color_by}"] for g in genes] for s in senders], dtype=float).reshape(len(senders), len(genes))
        size = np.array([[sub.at[g, f"{s}_{size_by}"] for g in genes] for s in senders], dtype=float).reshape(len(senders), len(genes))
        smax = np.nanmax(size) if size.size and np.isfinite(np.nanmax(size)) and np.nanmax(size) > 0 else 1.0
        areas = dot_min + (dot_max - dot_min) * np.clip(np.nan_to_num(size) / smax, 0, 1)
        fig, ax = new_figure(1, 1, width=max(5, 0.4 * len(genes) + 3), height=max(2.5, 0.5 * len(senders) + 1.5))
        a = ax[0, 0]
        yy, xx = np.meshgrid(np.arange(len(senders)), np.arange(len(genes)), indexing="ij")
        sc = a.scatter(xx.ravel(), yy.ravel(), s=areas.ravel(), c=np.clip(colour.ravel(), -vrange, vrange),
                       cmap="RdBu_r", vmin=-vrange, vmax=vrange, edgecolors="grey", linewidths=0.3)
        a.set_xticks(range(len(genes)), genes, rotation=90)
        a.set_yticks(range(len(senders)), senders)
        a.set_xlim(-0.7, len(genes) - 0.3)
        a.set_ylim(-0.7, len(senders) - 0.3)
        fig.colorbar(sc, ax=a, label=color_by, shrink=0.7)
        levels = np.linspace(smax / max(step, 1), smax, max(step, 1))
        handles = [a.scatter([], [], s=dot_min + (dot_max - dot_min) * lv / smax, color="grey") for lv in levels]
        a.legend(handles, [f"{lv:.2g}" for lv in levels], title=size_by, loc="upper left", bbox_to_anchor=(1.25, 1),
                 frameon=False)
        rec = sub["cell_type"].iloc[0]
        a.set(xlabel="gene", ylabel="ablated sender type", title=f"receiver {rec}")
        return finish_figure(fig, f"featurewise_contributions_dotplot_{rec}", show=show, save_png=save_png,
                             save_svg=save_svg, save_dir=save_dir)

    def get_interaction_circos_plot(
        self,
        cell_type_sub=None,
        significance_threshold: float = 0.05,
        palette=None,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
        weight: str = "count",
    ):
        """Chord (circos) diagram of :meth:`get_interaction_weight_matrix`, drawn with matplotlib.

        Each cell type is an arc of the circle, sized by its total incoming plus outgoing weight; each
        sender -> receiver weight is a ribbon in the sender's colour from the sender's arc to the
        receiver's, its width proportional to the weight (``amici-st`` draws this with ``openchord``,
        which cellvi does not need).

        Returns
        -------
        The :class:`matplotlib.figure.Figure`.
        """
        from matplotlib.patches import PathPatch, Wedge
        from matplotlib.path import Path as MplPath

        W = self.get_interaction_weight_matrix(significance_threshold, weight=weight)
        types = list(dict.fromkeys([*W.index, *W.columns]))
        if cell_type_sub is not None:
            unknown = [c for c in cell_type_sub if c not in types]
            if unknown:
                raise ValueError(f"cell_type_sub holds unknown cell types {unknown}; expected some of {types}.")
            types = list(cell_type_sub)
        M = W.reindex(index=types, columns=types, fill_value=0).to_numpy(dtype=np.float64)
        colours = palette_for(types, palette)
        fig, ax = new_figure(1, 1, width=5.5, height=5.5)
        a = ax[0, 0]
        total = M.sum(1) + M.sum(0)
        gap = 2 * np.pi * 0.02
        span = (2 * np.pi - gap * len(types)) * (total / total.sum() if total.sum() > 0 else np.full(len(types), 1 / len(types)))
        starts = np.concatenate([[0.0], np.cumsum(span + gap)[:-1]])
        cursor = starts.copy()
        scale = span / np.where(total > 0, total, 1)

        def point(theta, r=0.9):
            return np.array([r * np.cos(theta), r * np.sin(theta)])

        for i, t in enumerate(types):
            a.add_patch(Wedge((0, 0), 1.0, np.degrees(starts[i]), np.degrees(starts[i] + span[i]), width=0.08,
                              color=colours[t]))
            mid = starts[i] + span[i] / 2
            a.text(*point(mid, 1.12), t, ha="center", va="center")
        for i in range(len(types)):
            for j in range(len(types)):
                w = M[i, j]
                if w <= 0:
                    continue
                s0, s1 = cursor[i], cursor[i] + w * scale[i]
                cursor[i] = s1
                t0, t1 = cursor[j], cursor[j] + w * scale[j]
                cursor[j] = t1
                arc_t = [point(x) for x in np.linspace(t0, t1, 16)]
                arc_s = [point(x) for x in np.linspace(s1, s0, 16)]
                verts = [point(s0), (0, 0), point(t0), *arc_t[1:], (0, 0), point(s1), *arc_s[1:], point(s0)]
                codes = [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3, *[MplPath.LINETO] * 15,
                         MplPath.CURVE3, MplPath.CURVE3, *[MplPath.LINETO] * 15, MplPath.CLOSEPOLY]
                a.add_patch(PathPatch(MplPath(verts, codes), facecolor=colours[types[i]], alpha=0.6, lw=0))
        a.set(xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal", title="sender -> receiver interactions")
        a.set_axis_off()
        return finish_figure(fig, "interaction_circos_plot", show=show, save_png=save_png, save_svg=save_svg,
                             save_dir=save_dir)

    def plot_interaction_weight_heatmap(
        self,
        significance_threshold: float = 0.05,
        vmin: float = 0,
        vmax: float | None = 80,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
        weight: str = "count",
    ):
        """Heatmap of :meth:`get_interaction_weight_matrix` (senders as rows, receivers as columns)."""
        import seaborn as sns

        W = self.get_interaction_weight_matrix(significance_threshold, weight=weight)
        if weight != "count" and vmax == 80:
            vmax = None
        fig, ax = new_figure(1, 1, width=max(4, 0.6 * W.shape[1] + 2.5), height=max(3, 0.5 * W.shape[0] + 1.5))
        sns.heatmap(W, ax=ax[0, 0], vmin=vmin, vmax=vmax, annot=True, fmt="d" if weight == "count" else ".2g",
                    cmap="Reds", cbar_kws={"label": "significant genes" if weight == "count" else "ablation"})
        ax[0, 0].set(xlabel="receiver", ylabel="sender", title="interaction weights")
        return finish_figure(fig, "interaction_weight_heatmap", show=show, save_png=save_png, save_svg=save_svg,
                             save_dir=save_dir)

    def plot_interaction_directed_graph(
        self,
        cell_type_sub=None,
        significance_threshold: float = 0.05,
        weight_threshold: float = 0,
        node_size: float = 1500,
        palette=None,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
        weight: str = "count",
    ):
        """Directed sender -> receiver graph; edges with weight >= ``weight_threshold`` (and > 0), width by weight.

        The :class:`networkx.DiGraph` drawn is attached to the figure as ``fig.graph``.
        """
        import networkx as nx

        W = self.get_interaction_weight_matrix(significance_threshold, weight=weight)
        nodes = list(dict.fromkeys([*W.index, *W.columns]))
        if cell_type_sub is not None:
            unknown = [c for c in cell_type_sub if c not in nodes]
            if unknown:
                raise ValueError(f"cell_type_sub holds unknown cell types {unknown}; expected some of {nodes}.")
            nodes = list(cell_type_sub)
        g = nx.DiGraph()
        g.add_nodes_from(nodes)
        for s in W.index:
            for r in W.columns:
                w = W.at[s, r].item()
                if s in nodes and r in nodes and w > 0 and w >= weight_threshold:
                    g.add_edge(s, r, weight=w)
        colours = palette_for(nodes, palette)
        fig, ax = new_figure(1, 1, width=5, height=5)
        a = ax[0, 0]
        pos = nx.circular_layout(g)
        weights = np.array([d["weight"] for *_, d in g.edges(data=True)], dtype=float)
        widths = 1 + 5 * weights / weights.max() if len(weights) else []
        nx.draw_networkx_nodes(g, pos, ax=a, node_size=node_size, node_color=[colours[n] for n in g.nodes])
        nx.draw_networkx_labels(g, pos, ax=a)
        nx.draw_networkx_edges(g, pos, ax=a, width=widths, arrowsize=20, node_size=node_size,
                               connectionstyle="arc3,rad=0.15")
        nx.draw_networkx_edge_labels(g, pos, ax=a, edge_labels={(u, v): f"{d['weight']:.3g}" for u, v, d in g.edges(data=True)},
                                     connectionstyle="arc3,rad=0.15")
        a.set_axis_off()
        a.set_title("sender -> receiver interactions")
        fig.graph = g
        return finish_figure(fig, "interaction_directed_graph", show=show, save_png=save_png, save_svg=save_svg,
                             save_dir=save_dir)


# ---------------------------------------------------------------------- helpers
def _positions(values, obs_names: pd.Index) -> np.ndarray:
    arr = np.asarray(list(values))
    if arr.size == 0:
        raise ValueError("ablated_neighbor_indices is empty; expected at least one neighbour cell.")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() >= len(obs_names):
            raise ValueError(f"ablated_neighbor_indices must hold positions in [0, {len(obs_names) - 1}] or obs names.")
        return arr.astype(np.int64)
    pos = obs_names.get_indexer(arr.astype(str))
    if np.any(pos < 0):
        raise ValueError(f"ablated_neighbor_indices holds names not in obs_names, e.g. {arr[pos < 0][0]!r}.")
    return pos


def _head_readout(data: ModelData) -> torch.Tensor | None:
    """The per-head read-out ``W_h`` (H, D, G) when the module exposes it (``head_out``), else None."""
    w = getattr(data.module, "head_out", None)
    if isinstance(w, torch.Tensor) and w.dim() == 3 and w.shape[0] == data.n_heads and w.shape[2] == data.store.n_genes:
        return w
    return None


def _ablated_predictions(data: ModelData, batch: dict, ablated: torch.Tensor, heads, readout):
    """The full prediction (B, G) and, per group, ``full - ablated`` (S, B, G), where the ablated prediction has
    the post-softmax attention to the group's neighbours zeroed.

    ``ablated`` (S, B, K) marks the neighbours of each group. The prediction is linear in the post-softmax
    weights, so with the read-out ``W_h`` at hand one forward pass suffices: the ablated prediction is the
    full one minus ``sum_h W_h sum_{j in group} a_hj v_hj``. Otherwise the minibatch is replicated S+1 times
    with the module's ``attention_scale`` hook (per-neighbour features still computed once).
    """
    keys = data.keys
    n_groups, b = ablated.shape[0], ablated.shape[1]
    if readout is None:
        keep = torch.cat([torch.zeros_like(ablated[:1]), ablated]).logical_not()
        scale = keep.reshape((n_groups + 1) * b, 1, -1).float()
        _, gen = data.forward(batch, repeats=n_groups + 1, attention_scale=scale)
        pred = _head_prediction(gen, keys, heads).reshape(n_groups + 1, b, -1)
        return pred[0], pred[0][None] - pred[1:]
    inf, gen = data.forward(batch)
    full = _head_prediction(gen, keys, heads)  # (B, G)
    hs = list(range(data.n_heads)) if heads is None else heads
    a = gen[keys.ATTENTION][:, hs, :-1]  # (B, h, K)
    v = inf[keys.VALUES][batch[keys.NN_INVERSE]][:, :, hs]  # (B, K, h, D)
    weights = a[:, :, :, None] * ablated.permute(1, 2, 0)[:, None].to(a.dtype)  # (B, h, K, S)
    z = torch.einsum("bhks,bkhd->sbhd", weights, v)
    return full, torch.einsum("sbhd,hdg->sbg", z, readout[hs].to(z.dtype))


def _head_prediction(gen: dict, keys, heads) -> torch.Tensor:
    """Prediction keeping only ``heads`` (all when None): drop the other heads' residuals."""
    pred = gen[keys.PREDICTION]
    if heads is None:
        return pred
    hr = gen[keys.HEAD_RESIDUALS]
    drop = [h for h in range(hr.shape[1]) if h not in heads]
    return pred - hr[:, drop].sum(1) if drop else pred


def _check_score_col(col: str, sub: pd.DataFrame, senders) -> None:
    if not senders or f"{senders[0]}_{col}" not in sub.columns:
        avail = [s for s in _SCORES if senders and f"{senders[0]}_{s}" in sub.columns]
        raise ValueError(f"score column {col!r} is not available; expected one of {avail} (z-values need compute_z_value=True).")


class _Accumulator:
    """Streaming per-gene sums for one receiver type and S ablation groups."""

    def __init__(self, n_groups: int, n_genes: int, device, with_z: bool):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.abl, self.diff = z(n_groups, n_genes), z(n_groups, n_genes)
        self.sx, self.sxx = z(n_genes), z(n_genes)
        self.n = 0
        self.corr = StreamingCorrelation() if with_z else None

    def update(self, full: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> None:
        """``full`` (B, G) prediction, ``delta`` (S, B, G) = full - ablated, ``x`` (B, G) observed."""
        r0 = (full - x).double()
        d = delta.double()
        # R_s^2 - R0^2 with R_s = R0 - delta, without cancellation
        self.abl += (d * (d - 2 * r0[None])).sum(1)
        self.diff += d.sum(1)
        xd = x.double()
        self.sx += xd.sum(0)
        self.sxx += xd.square().sum(0)
        self.n += x.shape[0]
        if self.corr is not None:
            a = delta.abs().transpose(0, 1)  # (B, S, G)
            self.corr.update(a, x[:, None, :].expand_as(a))

    def frame(self, groups, data: ModelData, r: int, head_idx) -> pd.DataFrame:
        n = self.n
        cols = {}
        abl = (self.abl / n).cpu().numpy()
        diff = (self.diff / n).cpu().numpy()
        if self.corr is not None:
            if n >= 3:
                z = correlation_to_z(self.corr.result(), n)
            else:
                z = np.full(abl.shape, np.nan)
            nl10 = z_to_nl10_pvalue(z)
            nl10_adj = bh_adjust_nl10(nl10, axis=1)
        for i, s in enumerate(groups):
            cols[f"{s}_ablation"] = abl[i]
            cols[f"{s}_diff"] = diff[i]
            if self.corr is not None:
                cols[f"{s}_z_value"] = z[i]
                cols[f"{s}_nl10_pval"] = nl10[i]
                cols[f"{s}_nl10_pval_adj"] = nl10_adj[i]
        mean = self.sx / n
        var = ((self.sxx - n * mean.square()) / max(n - 1, 1)).clamp(min=0)
        cols["gene_variance"] = var.cpu().numpy()
        df = pd.DataFrame(cols)
        df["gene"] = np.asarray(data.var_names)
        df["head_idx"] = pd.array([head_idx] * len(df), dtype="Int64")
        df["cell_type"] = data.categories[r]
        return df


def _empty_frame(groups, with_z: bool) -> pd.DataFrame:
    cols = [f"{s}_{k}" for s in groups for k in (_SCORES if with_z else _SCORES[:2])]
    df = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in [*cols, "gene_variance"]})
    df["gene"] = pd.Series(dtype=object)
    df["head_idx"] = pd.Series(dtype="Int64")
    df["cell_type"] = pd.Series(dtype=object)
    return df
