"""Counterfactual attention: each candidate sender placed alone next to a virtual receiver of one type."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ._access import ModelData, eval_mode
from ._plotting import finish_figure, new_figure, palette_for
from ._stats import bootstrap_ci

_COLUMNS = (
    "query_label",
    "neighbor_idx",
    "neighbor_label",
    "head_idx",
    "base_attention_score",
    "pos_coef",
    "dummy_attention_score",
    "distance_kernel_unit_scale",
)


class AMICICounterfactualAttentionModule:
    """Counterfactual attention of a trained AMICI model for one receiver (query) cell type.

    Every candidate sender ``j`` (a cell that is a neighbour of at least one receiver of the query
    type) is placed as the only neighbour of a virtual receiver of the query type. The model gives
    its base score ``s_hj`` (``q.k / sqrt(d)``) and distance coefficient ``beta_hj`` per head; against
    the dummy key (score ``delta``, the model's own) its attention at distance ``d`` is

    ``a_hj(d) = sigmoid(s_hj - beta_hj d / u - delta)``

    with ``u`` the distance kernel unit scale. The interaction length scale at threshold ``tau`` is the
    distance where ``a`` falls to ``tau``: ``d* = (u / beta)(s - delta + log((1 - tau) / tau))``,
    clipped at 0.
    """

    def __init__(
        self,
        _adata=None,
        _cell_type=None,
        _counterfactual_attention_df: pd.DataFrame | None = None,
        _compute_kwargs: dict | None = None,
        _nn_labels_for_query=None,
        _nn_dists_for_query=None,
        _label_names=None,
    ):
        self._adata = _adata
        self._cell_type = _cell_type
        self._counterfactual_attention_df = _counterfactual_attention_df
        self._compute_kwargs = _compute_kwargs or {}
        self._nn_labels_for_query = _nn_labels_for_query
        self._nn_dists_for_query = _nn_dists_for_query
        self._label_names = _label_names

    @classmethod
    def compute(
        cls,
        model,
        cell_type: str,
        adata=None,
        indices=None,
        head_idxs=None,
        batch_size: int | None = None,
        *,
        prog_bar: bool = True,
    ) -> AMICICounterfactualAttentionModule:
        """Compute the counterfactual attention patterns for a given cell type and head indices.

        Parameters
        ----------
        model
            The trained AMICI model.
        cell_type
            The index cell type to get counterfactual attention scores for.
        adata
            Optional AnnData object to use. If None, uses model.adata.
        indices
            Optional list of cell indices to get scores for. If None, uses all cells. Only cells that
            are a neighbour of at least one receiver of ``cell_type`` (hence of another type) are scored.
        head_idxs
            Optional list of attention head indices to get scores for. If None, uses all heads.
        batch_size
            Optional batch size to use for the data loader.
        prog_bar
            Whether to show a progress bar.

        Returns
        -------
        :class:`AMICICounterfactualAttentionModule` with the scores in ``_counterfactual_attention_df``,
        one row per (sender, head), with columns ``query_label``, ``neighbor_idx`` (int64 position of
        the sender in ``adata``, as in ``amici-st``; ``adata.obs_names[neighbor_idx]`` gives its name),
        ``neighbor_label``, ``head_idx``, ``base_attention_score``, ``pos_coef``,
        ``dummy_attention_score`` and ``distance_kernel_unit_scale``.
        """
        data = ModelData(model, adata)
        code = data.code_of(cell_type)
        heads = data.head_list(head_idxs)
        bs = data.batch_size(batch_size)
        receivers = data.labels == code
        candidates = np.unique(data.nn_idx[receivers])
        chosen = data.indices(indices)
        candidates = candidates[np.isin(candidates, chosen)]
        candidates = candidates[data.labels[candidates] != code]
        module = data.module
        base_parts, coef_parts = [], []
        with eval_mode(module):
            for s in _track(range(0, len(candidates), bs), prog_bar, f"counterfactual attention: {cell_type}"):
                idx = torch.as_tensor(candidates[s : s + bs], device=data.device)
                x = data.store.rows(idx)[:, None, :]
                labels = torch.full((len(idx),), code, dtype=torch.long, device=data.device)
                out = module.attention_scores(labels, x, torch.zeros(len(idx), 1, device=data.device))
                base_parts.append(out["base_scores"][:, heads, 0].float().cpu())
                coef_parts.append(out["distance_coef"][:, heads, 0].float().cpu())
        n, h = len(candidates), len(heads)
        base = torch.cat(base_parts).numpy() if base_parts else np.zeros((0, h), np.float32)
        coef = torch.cat(coef_parts).numpy() if coef_parts else np.zeros((0, h), np.float32)
        cats = pd.CategoricalDtype(list(data.categories))
        df = pd.DataFrame(
            {
                "query_label": pd.Categorical([data.categories[code]] * (n * h), dtype=cats),
                "neighbor_idx": np.repeat(candidates.astype(np.int64), h),
                "neighbor_label": pd.Categorical.from_codes(np.repeat(data.labels[candidates], h), dtype=cats),
                "head_idx": np.tile(np.asarray(heads, dtype=np.int64), n),
                "base_attention_score": base.reshape(-1),
                "pos_coef": coef.reshape(-1),
                "dummy_attention_score": np.full(n * h, float(module.dummy_score)),
                "distance_kernel_unit_scale": np.full(n * h, float(module.distance_kernel_unit_scale)),
            }
        )
        kwargs = {"cell_type": cell_type, "indices": indices, "head_idxs": heads, "batch_size": batch_size}
        return cls(
            data.adata,
            _cell_type=str(cell_type),
            _counterfactual_attention_df=df,
            _compute_kwargs=kwargs,
            _nn_labels_for_query=data.labels[data.nn_idx[receivers]],
            _nn_dists_for_query=data.nn_dist[receivers],
            _label_names=np.asarray(data.categories),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def counterfactual_attention(self) -> pd.DataFrame:
        """The per-(sender, head) scores (a copy of ``_counterfactual_attention_df``)."""
        return self._counterfactual_attention_df.copy()

    def _rows(self, head_idxs=None, sender_types=None) -> pd.DataFrame:
        df = self._counterfactual_attention_df
        computed = sorted(df["head_idx"].unique().tolist())
        if head_idxs is not None:
            head_idxs = [head_idxs] if isinstance(head_idxs, (int, np.integer)) else list(head_idxs)
            missing = [h for h in head_idxs if h not in computed]
            if missing:
                raise ValueError(f"head_idxs {missing} were not computed; computed heads: {computed}.")
            df = df[df["head_idx"].isin(head_idxs)]
        if sender_types is not None:
            sender_types = [sender_types] if isinstance(sender_types, str) else list(sender_types)
            known = list(df["neighbor_label"].cat.categories)
            unknown = [s for s in sender_types if s not in known]
            if unknown:
                raise ValueError(f"sender_types holds unknown cell types {unknown}; expected some of {known}.")
            df = df[df["neighbor_label"].isin(sender_types)]
        return df

    def save(self, save_path) -> None:
        """Save the counterfactual scores to a CSV file (written atomically)."""
        from cellvi._io import atomic_path

        with atomic_path(save_path) as tmp:
            self._counterfactual_attention_df.to_csv(tmp, index=False)

    # ------------------------------------------------------------------ curves
    def calculate_counterfactual_attention_at_distances(self, head_idx: int, distances) -> pd.DataFrame:
        """Attention ``sigmoid(s - beta d / u - delta)`` of each sender alone against the dummy, at ``distances``.

        Returns
        -------
        :class:`pandas.DataFrame` with one row per (sender, distance) and columns ``query_label``,
        ``neighbor_idx``, ``neighbor_label``, ``head_{head_idx}`` (float) and ``distance``.
        """
        d = np.asarray(distances, dtype=np.float64).ravel()
        if d.size == 0 or not np.all(np.isfinite(d)) or np.any(d < 0):
            raise ValueError("distances must be a non-empty sequence of finite numbers >= 0.")
        rows = self._rows([head_idx])
        s = rows["base_attention_score"].to_numpy(np.float64)[:, None]
        beta = rows["pos_coef"].to_numpy(np.float64)[:, None]
        delta = rows["dummy_attention_score"].to_numpy(np.float64)[:, None]
        u = rows["distance_kernel_unit_scale"].to_numpy(np.float64)[:, None]
        logit = s - beta * d[None, :] / u - delta
        att = 1.0 / (1.0 + np.exp(-logit))
        n, m = att.shape
        return pd.DataFrame(
            {
                "query_label": pd.Categorical(np.repeat(rows["query_label"].to_numpy(), m),
                                              dtype=rows["query_label"].dtype),
                "neighbor_idx": np.repeat(rows["neighbor_idx"].to_numpy(np.int64), m),
                "neighbor_label": pd.Categorical(np.repeat(rows["neighbor_label"].to_numpy(), m),
                                                 dtype=rows["neighbor_label"].dtype),
                f"head_{head_idx}": att.reshape(-1),
                "distance": np.tile(d, n),
            }
        )

    # ------------------------------------------------------------------ length scales
    def calculate_length_scales(
        self,
        head_idxs=None,
        sender_types=None,
        attention_threshold: float = 0.5,
        sample_threshold: float = 0.02,
    ) -> pd.DataFrame:
        """Interaction length scale of every (sender, head): where its counterfactual attention falls to ``attention_threshold``.

        ``d* = (u / beta)(s - delta + log((1 - tau) / tau))``, clipped at 0, with the model's dummy score
        ``delta``. Artefact filter: for each (head, sender type), if fewer than ``sample_threshold`` of the
        query-type receivers have a sender of that type within the median ``d*`` in their neighbour list,
        that pair's length scales are set to 0 (the model never saw such pairs at such distances).

        Parameters
        ----------
        head_idxs
            Heads (default: all computed).
        sender_types
            Sender cell types (default: all).
        attention_threshold
            ``tau`` in (0, 1). ``amici-st`` 0.1.0 defaults to 0.1 (the paper's figures), its main branch to 0.5.
        sample_threshold
            Minimum fraction of receivers for the artefact filter (0 disables it).

        Returns
        -------
        :class:`pandas.DataFrame`: ``neighbor_idx``, ``neighbor_label``, ``head_idx``, ``length_scale``
        (float64) and ``filtered`` (bool, set to 0 by the artefact filter).
        """
        if not 0 < attention_threshold < 1:
            raise ValueError(f"attention_threshold must be a number in (0, 1), got {attention_threshold!r}.")
        if not 0 <= sample_threshold <= 1:
            raise ValueError(f"sample_threshold must be a number in [0, 1], got {sample_threshold!r}.")
        rows = self._rows(head_idxs, sender_types)
        s = rows["base_attention_score"].to_numpy(np.float64)
        beta = rows["pos_coef"].to_numpy(np.float64)
        delta = rows["dummy_attention_score"].to_numpy(np.float64)
        u = rows["distance_kernel_unit_scale"].to_numpy(np.float64)
        tau = attention_threshold
        ls = np.clip(u / beta * (s - delta + math.log((1 - tau) / tau)), 0.0, None)
        out = pd.DataFrame(
            {
                "neighbor_idx": rows["neighbor_idx"].to_numpy(np.int64),
                "neighbor_label": rows["neighbor_label"].to_numpy(),
                "head_idx": rows["head_idx"].to_numpy(np.int64),
                "length_scale": ls,
            },
        )
        out["neighbor_label"] = pd.Categorical(out["neighbor_label"], dtype=rows["neighbor_label"].dtype)
        filtered = np.zeros(len(out), dtype=bool)
        if sample_threshold > 0 and len(out):
            med = out.groupby(["head_idx", "neighbor_label"], observed=True)["length_scale"].median()
            labels = self._nn_labels_for_query  # (n_rec, K) codes
            dists = self._nn_dists_for_query
            names = list(self._label_names)
            for sender in med.index.get_level_values(1).unique():
                code = names.index(sender)
                nearest = np.where(labels == code, dists, np.inf).min(axis=1) if len(labels) else np.zeros(0)
                heads_s = med.xs(sender, level=1)
                frac = (nearest[None, :] <= heads_s.to_numpy()[:, None]).mean(axis=1) if len(nearest) else np.zeros(len(heads_s))
                bad_heads = heads_s.index[frac < sample_threshold]
                filtered |= (out["neighbor_label"].to_numpy() == sender) & out["head_idx"].isin(bad_heads).to_numpy()
        out.loc[filtered, "length_scale"] = 0.0
        out["filtered"] = filtered
        return out

    _calculate_length_scales = calculate_length_scales

    def length_scale_confidence_intervals(
        self,
        head_idxs=None,
        sender_types=None,
        attention_threshold: float = 0.5,
        sample_threshold: float = 0.02,
        statistic: str = "median",
        n_bootstrap: int = 10_000,
        confidence: float = 0.95,
        random_state: int | None = 0,
    ) -> pd.DataFrame:
        """Percentile-bootstrap confidence intervals of the length scale per (head, sender type).

        Returns
        -------
        :class:`pandas.DataFrame` with columns ``head_idx``, ``neighbor_label``, ``n``, ``estimate``
        (the ``statistic`` of the length scales), ``ci_low`` and ``ci_high``.
        """
        ls = self.calculate_length_scales(head_idxs, sender_types, attention_threshold, sample_threshold)
        keys = ls["head_idx"].astype(str) + "\x1f" + ls["neighbor_label"].astype(str)
        ci = bootstrap_ci(ls["length_scale"].to_numpy(), keys.to_numpy(), statistic=statistic, n_bootstrap=n_bootstrap,
                          confidence=confidence, random_state=random_state)
        parts = ci.index.to_series().str.split("\x1f", expand=True)
        ci = ci.reset_index(drop=True)
        ci.insert(0, "neighbor_label", pd.Categorical(parts[1].to_numpy() if len(parts) else [],
                                                      dtype=ls["neighbor_label"].dtype))
        ci.insert(0, "head_idx", parts[0].astype(np.int64).to_numpy() if len(parts) else np.zeros(0, np.int64))
        return ci.sort_values(["head_idx", "neighbor_label"], ignore_index=True)

    # ------------------------------------------------------------------ plots
    def plot_counterfactual_attention_summary(
        self,
        head_idx: int,
        distances,
        neighbor_ct_sub=None,
        palette=None,
        save_dir: str = "./figures",
        save_svg: bool = False,
        save_png: bool = False,
        show: bool = True,
        wandb_log: bool = False,
        n_curves: int = 30,
    ):
        """Counterfactual attention against distance: mean +- sd per sender type and ``n_curves`` single senders each."""
        curves = self.calculate_counterfactual_attention_at_distances(head_idx, distances)
        col = f"head_{head_idx}"
        if neighbor_ct_sub is not None:
            curves = curves[curves["neighbor_label"].isin(list(neighbor_ct_sub))]
        senders = [c for c in curves["neighbor_label"].cat.categories if (curves["neighbor_label"] == c).any()]
        colours = palette_for(senders, palette)
        d = np.asarray(distances, dtype=np.float64).ravel()
        order = np.argsort(d, kind="stable")  # the curves keep the caller's order; plot them by distance
        d = d[order]
        fig, ax = new_figure(1, 1, width=5.5, height=4)
        a = ax[0, 0]
        rng = np.random.default_rng(0)
        for s in senders:
            att = curves.loc[curves["neighbor_label"] == s, col].to_numpy().reshape(-1, len(d))[:, order]
            for i in rng.choice(len(att), min(n_curves, len(att)), replace=False):
                a.plot(d, att[i], color=colours[s], alpha=0.15, lw=0.7)
            m, sd = att.mean(0), att.std(0)
            a.plot(d, m, color=colours[s], lw=2.2, label=f"{s} (n={len(att)})")
            a.fill_between(d, m - sd, m + sd, color=colours[s], alpha=0.2)
        a.set(xlabel="distance", ylabel="attention vs dummy", ylim=(0, 1),
              title=f"receiver {self._cell_type}, head {head_idx}")
        a.legend(title="sender", frameon=False)
        return finish_figure(fig, f"counterfactual_attention_{self._cell_type}_head{head_idx}", show=show,
                             save_png=save_png, save_svg=save_svg, save_dir=save_dir, wandb_log=wandb_log)

    def plot_length_scale_distribution(
        self,
        head_idxs=None,
        sender_types=None,
        attention_threshold: float = 0.5,
        max_length_scale: float = 50,
        sample_threshold: float = 0.02,
        palette: dict | None = None,
        plot_kde: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
        true_length_scale: float | None = None,
    ):
        """Distribution of the length scales per (head, sender type): box plots, or KDEs with ``plot_kde``.

        Length scales above ``max_length_scale`` are clipped for display. ``true_length_scale`` (e.g. a
        planted radius) is drawn as a reference line. The length scales and their bootstrap confidence
        intervals are attached to the figure as ``fig.length_scales`` and ``fig.confidence_intervals``.
        """
        import seaborn as sns

        ls = self.calculate_length_scales(head_idxs, sender_types, attention_threshold, sample_threshold)
        ci = self.length_scale_confidence_intervals(head_idxs, sender_types, attention_threshold, sample_threshold,
                                                    n_bootstrap=2000)
        shown = ls.assign(length_scale=ls["length_scale"].clip(upper=max_length_scale))
        shown["head"] = "head " + shown["head_idx"].astype(str)
        senders = [c for c in shown["neighbor_label"].cat.categories if (shown["neighbor_label"] == c).any()]
        shown["neighbor_label"] = shown["neighbor_label"].cat.remove_unused_categories()
        colours = palette_for(senders, palette)
        fig, ax = new_figure(1, 1, width=max(5, 0.9 * shown["head"].nunique() + 3), height=4)
        a = ax[0, 0]
        if plot_kde:
            for (h, s), grp in shown.groupby(["head", "neighbor_label"], observed=True):
                if grp["length_scale"].nunique() > 1:
                    sns.kdeplot(grp["length_scale"], ax=a, color=colours[s], label=f"{s}, {h}", clip=(0, max_length_scale))
            a.set(xlabel="length scale", ylabel="density")
            if true_length_scale is not None:
                a.axvline(true_length_scale, color="k", ls="--", label="true")
        else:
            sns.boxplot(data=shown, x="head", y="length_scale", hue="neighbor_label", palette=colours, ax=a,
                        showfliers=False)
            a.set(xlabel="", ylabel="length scale")
            if true_length_scale is not None:
                a.axhline(true_length_scale, color="k", ls="--", label="true")
        if a.get_legend_handles_labels()[0]:
            a.legend(frameon=False, fontsize=8)
        a.set_title(f"receiver {self._cell_type}: interaction length scales (tau={attention_threshold})")
        fig.length_scales = ls
        fig.confidence_intervals = ci
        return finish_figure(fig, f"length_scales_{self._cell_type}", show=show, save_png=save_png,
                             save_svg=save_svg, save_dir=save_dir)


def _track(seq, prog_bar: bool, desc: str):
    from scvi.utils import track

    return track(seq, description=desc, disable=not prog_bar, style="tqdm")
