"""Attention patterns of a trained AMICI model: per cell, head and neighbour; summaries and communication hubs."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch

from ._access import ModelData, eval_mode
from ._plotting import finish_figure, new_figure, palette_for
from ._stats import kmeans_silhouette

FLAVORS = ("vanilla", "value-weighted", "info-weighted", "gene-weighted")


def _inverse_order(idx: np.ndarray, order: np.ndarray) -> np.ndarray:
    """A position in ``order`` of each element of ``idx`` (``order`` is a permutation of ``idx``)."""
    sorter = np.argsort(order, kind="stable")
    return sorter[np.searchsorted(order, idx, sorter=sorter)]


class AMICIAttentionModule:
    """Attention patterns of a trained AMICI model (build it with :meth:`compute`).

    Stores

    * ``_attention_patterns_df``: one row per (cell, head): ``neighbor_0 .. neighbor_{K-1}`` (float32, the
      attention to each neighbour slot, the dummy left out), ``head_idx`` (int64), ``label`` (categorical
      cell type) and ``cell_idx`` (obs name);
    * ``_nn_idxs_df``: obs names of the neighbours, indexed by cell (``neighbor_{i}`` columns);
    * ``_nn_dists_df``: their distances (float32), indexed by cell.

    The patterns are also kept as one (n_cells, H, K) float32 array (``_attention``) for array code.
    """

    def __init__(
        self,
        _adata=None,
        _labels_key=None,
        _attention_patterns_df: pd.DataFrame | None = None,
        _nn_idxs_df: pd.DataFrame | None = None,
        _nn_dists_df: pd.DataFrame | None = None,
        _compute_kwargs: dict | None = None,
        _flavor: str | None = None,
    ):
        self._adata = _adata
        self._labels_key = _labels_key
        self._attention_patterns_df = _attention_patterns_df
        self._nn_idxs_df = _nn_idxs_df
        self._nn_dists_df = _nn_dists_df
        self._compute_kwargs = _compute_kwargs or {}
        self._flavor = _flavor
        self._attention = None  # (n, H, K) float32
        self._labels = None  # (n,) int codes
        self._nn_labels = None  # (n, K) int codes
        self._nn_dist = None  # (n, K) float32
        self._categories = None

    @classmethod
    def compute(
        cls,
        model,
        adata=None,
        indices=None,
        batch_size: int | None = None,
        flavor: Literal["vanilla", "value-weighted", "info-weighted", "gene-weighted"] = "vanilla",
        prog_bar: bool = True,
    ) -> AMICIAttentionModule:
        """Different flavors of attention patterns retrieved from cache.

        One forward pass per minibatch; the flavours weight the post-softmax attention ``a_hj`` of cell
        ``i``'s head ``h`` to neighbour ``j`` by what the neighbour sends through that head:

        * ``"vanilla"``: ``a_hj``;
        * ``"value-weighted"``: ``a_hj ||v_hj||``, the norm of the value vector;
        * ``"info-weighted"``: ``a_hj ||W_h v_hj / sigma||``, the norm of the head's write to the
          expression, each gene scaled by its standard deviation over the cells (so the weight measures
          the change in units of natural variability: cellvi's read-out has no intermediate model space
          such as ``amici-st``'s ``W_O``);
        * ``"gene-weighted"``: ``a_hj ||W_h v_hj||``, the norm of the head's write in gene space.

        Parameters
        ----------
        model
            A trained :class:`cellvi.AMICI`.
        adata
            AnnData object to get attention patterns from.
        indices
            Indices of the cells to get attention patterns from.
        batch_size
            Batch size to use for the data loader.
        flavor
            Flavor of attention patterns to retrieve.
        prog_bar
            Whether to show a progress bar.

        Returns
        -------
        :class:`AMICIAttentionModule` (see the class docstring for what it stores).
        """
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {list(FLAVORS)}, got {flavor!r}.")
        data = ModelData(model, adata)
        idx = data.indices(indices)
        order = data.spatial_order(idx)  # adjacent receivers share neighbours: fewer embeddings per batch
        keys = data.keys
        module = data.module
        parts = []
        with eval_mode(module):
            scale = data.gene_std().float().clamp(min=1e-6) if flavor == "info-weighted" else None
            for batch in data.batches(order, data.batch_size(batch_size), prog_bar, f"attention ({flavor})"):
                inf, gen = data.forward(batch)
                a = gen[keys.ATTENTION][..., :-1]  # (B, H, K)
                inv = batch[keys.NN_INVERSE]
                if flavor == "value-weighted":
                    w = inf[keys.VALUES].norm(dim=-1)  # (U, H)
                    a = a * w[inv].transpose(1, 2)
                elif flavor in ("info-weighted", "gene-weighted"):
                    contrib = module.value_contributions(batch[keys.NN_X_UNIQUE])  # (U, H, G)
                    if scale is not None:
                        contrib = contrib / scale
                    w = contrib.norm(dim=-1)  # (U, H)
                    a = a * w[inv].transpose(1, 2)
                parts.append(a.float().cpu())
        att = torch.cat(parts).numpy() if parts else np.zeros((0, data.n_heads, data.n_neighbors), np.float32)
        if len(idx):  # back to the order of ``indices`` (repeated indices have identical rows)
            att = att[_inverse_order(idx, order)]
        obj = cls(data.adata, _labels_key=data.labels_key, _compute_kwargs={"indices": indices, "batch_size": batch_size, "flavor": flavor},
                  _flavor=flavor)
        obj._set_arrays(att, data.labels[idx], data.labels[data.nn_idx[idx]], data.nn_dist[idx], data.categories,
                        data.obs_names[idx], data.obs_names, data.nn_idx[idx])
        return obj

    def _set_arrays(self, att, labels, nn_labels, nn_dist, categories, cell_names, all_names, nn_idx) -> None:
        n, H, K = att.shape
        self._attention, self._labels, self._nn_labels, self._nn_dist = att, labels, nn_labels, nn_dist
        self._categories = list(categories)
        cols = [f"neighbor_{k}" for k in range(K)]
        cats = pd.CategoricalDtype(self._categories)
        df = pd.DataFrame(att.reshape(n * H, K), columns=cols)
        df["head_idx"] = np.tile(np.arange(H, dtype=np.int64), n)
        df["label"] = pd.Categorical.from_codes(np.repeat(labels, H), dtype=cats)
        df["cell_idx"] = np.repeat(np.asarray(cell_names, dtype=object), H)
        self._attention_patterns_df = df
        index = pd.Index(np.asarray(cell_names, dtype=object), name="cell_idx")
        self._nn_idxs_df = pd.DataFrame(np.asarray(all_names, dtype=object)[nn_idx], index=index, columns=cols)
        self._nn_dists_df = pd.DataFrame(nn_dist.astype(np.float32), index=index, columns=cols)

    # ------------------------------------------------------------------ io
    @property
    def attention_patterns(self) -> pd.DataFrame:
        """The per-(cell, head) patterns (a copy of ``_attention_patterns_df``)."""
        return self._attention_patterns_df.copy()

    def save(self, save_path) -> None:
        """Save attention patterns to file (CSV, written atomically)."""
        from cellvi._io import atomic_path

        with atomic_path(save_path) as tmp:
            self._attention_patterns_df.to_csv(tmp, index=False)

    # ------------------------------------------------------------------ summaries
    def _edges(self, receiver_code: int, head: int):
        """Flattened (distance, neighbour type code, attention) of every edge of receivers of one type."""
        rows = self._labels == receiver_code
        return (self._nn_dist[rows].ravel(), self._nn_labels[rows].ravel(), self._attention[rows, head].ravel())

    def binned_attention(self, cell_type, head: int, max_distance=100, bin_size=5, min_bin_count=50) -> pd.DataFrame:
        """Mean and sd of the attention by distance bin and neighbour type, for receivers of ``cell_type``.

        Returns
        -------
        :class:`pandas.DataFrame`: ``distance_bin`` (bin start), ``neighbor_label``, ``count`` (int64),
        ``mean``, ``sd`` (float64); bins with fewer than ``min_bin_count`` edges are dropped.
        """
        if not max_distance > 0 or not bin_size > 0:
            raise ValueError("max_distance and bin_size must be positive numbers.")
        code = self._categories.index(cell_type) if cell_type in self._categories else None
        if code is None:
            raise ValueError(f"cell_type={cell_type!r} is not a cell type of the model; expected one of {self._categories}.")
        d, lab, a = self._edges(code, head)
        n_bins = int(np.ceil(max_distance / bin_size))
        keep = d < max_distance
        b = (d[keep] // bin_size).astype(np.int64)
        key = b * len(self._categories) + lab[keep]
        size = n_bins * len(self._categories)
        cnt = np.bincount(key, minlength=size)
        s1 = np.bincount(key, weights=a[keep].astype(np.float64), minlength=size)
        s2 = np.bincount(key, weights=a[keep].astype(np.float64) ** 2, minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s1 / cnt
            sd = np.sqrt(np.maximum(s2 / cnt - mean**2, 0))
        bins, labs = np.divmod(np.arange(size), len(self._categories))
        df = pd.DataFrame(
            {
                "distance_bin": bins * float(bin_size),
                "neighbor_label": pd.Categorical.from_codes(labs, categories=self._categories),
                "count": cnt.astype(np.int64),
                "mean": mean,
                "sd": sd,
            }
        )
        return df[df["count"] >= max(min_bin_count, 1)].reset_index(drop=True)

    def plot_attention_summary(
        self,
        cell_type_sub=None,
        sel_head: int | None = None,
        plot_histogram: bool = False,
        palette=None,
        max_distance: float = 100,
        bin_size: float = 5,
        min_bin_count: int = 50,
        epoch: int | None = None,
        wandb_log: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Plot a summary of attention patterns for different cell types and heads.

        One row per receiver type and one column per head (or only ``sel_head``): mean +- sd attention
        against the distance bin, one line per neighbour type.

        Parameters
        ----------
        cell_type_sub
            List of cell types to consider. Defaults to None (all).
        sel_head
            Selected head index. Defaults to None (all heads).
        plot_histogram
            Whether to plot a histogram of attention scores (an extra column per receiver type).
        palette
            Color palette for the plot (a seaborn palette name, a list, or a dict by cell type).
        max_distance
            Maximum distance for binning. Defaults to 100.
        bin_size
            Size of each bin. Defaults to 5.
        min_bin_count
            Minimum count of edges in a (bin, neighbour type) group to be drawn. Defaults to 50.
        epoch
            Epoch number for logging. Defaults to None.
        wandb_log
            Whether to log the plot to Weights and Biases (needs ``wandb``). Defaults to False.
        show
            Whether to show the plot. Defaults to True.
        save_png
            Whether to save the plot as a PNG file. Defaults to False.
        save_svg
            Whether to save the plot as an SVG file. Defaults to False.
        save_dir
            Directory to save the plot. Defaults to "./figures".

        Returns
        -------
        The :class:`matplotlib.figure.Figure`.
        """
        self._require()
        cts = self._categories if cell_type_sub is None else list(cell_type_sub)
        unknown = [c for c in cts if c not in self._categories]
        if unknown:
            raise ValueError(f"cell_type_sub holds unknown cell types {unknown}; expected some of {self._categories}.")
        H = self._attention.shape[1]
        if sel_head is not None and not (isinstance(sel_head, (int, np.integer)) and 0 <= sel_head < H):
            raise ValueError(f"sel_head must be a head index in [0, {H - 1}], got {sel_head!r}.")
        heads = list(range(H)) if sel_head is None else [int(sel_head)]
        colours = palette_for(self._categories, palette)
        ncols = len(heads) + int(plot_histogram)
        fig, axes = new_figure(len(cts), ncols, width=3.6, height=2.8, sharey=False)
        for i, ct in enumerate(cts):
            for j, h in enumerate(heads):
                ax = axes[i, j]
                binned = self.binned_attention(ct, h, max_distance, bin_size, min_bin_count)
                for lab, grp in binned.groupby("neighbor_label", observed=True):
                    x = grp["distance_bin"] + bin_size / 2
                    ax.errorbar(x, grp["mean"], yerr=grp["sd"], marker="o", ms=3, lw=1, capsize=2,
                                color=colours[lab], label=str(lab))
                ax.set(title=f"{ct} receivers, head {h}", xlabel="distance", ylabel="attention" if j == 0 else "")
                if binned.empty:
                    ax.text(0.5, 0.5, f"no bin with >= {min_bin_count} edges", ha="center", transform=ax.transAxes)
                elif i == 0 and j == 0:
                    ax.legend(title="neighbour", frameon=False, fontsize=7)
            if plot_histogram:
                ax = axes[i, -1]
                code = self._categories.index(ct)
                rows = self._labels == code
                for lab_code, lab in enumerate(self._categories):
                    mask = self._nn_labels[rows] == lab_code  # (r, K)
                    vals = self._attention[rows][:, heads, :].transpose(0, 2, 1)[mask].ravel()
                    if vals.size:
                        ax.hist(vals, bins=40, histtype="step", color=colours[lab], label=lab, log=True)
                ax.set(title=f"{ct} receivers: attention", xlabel="attention", ylabel="edges")
        fig.tight_layout()
        name = "attention_summary" + ("" if epoch is None else f"_epoch{epoch}")
        return finish_figure(fig, name, show=show, save_png=save_png, save_svg=save_svg, save_dir=save_dir,
                             wandb_log=wandb_log, epoch=epoch)

    def _require(self) -> None:
        if self._attention is None:
            raise ValueError("No attention patterns: build the module with AMICIAttentionModule.compute(model, ...).")

    def compute_communication_hubs(
        self,
        attention_quantile_threshold: float = 0.9,
        n_clusters: int | None = None,
        random_state: int = 42,
        *,
        silhouette_sample_size: int = 2000,
    ) -> pd.DataFrame:
        """Compute hub analysis by clustering cells based on their high-interacting neighbor composition.

        1. Aggregates attention scores by taking the max across all heads.
        2. For each receiver cell type, computes a threshold as the specified quantile of the non-zero
           attention scores to receivers of that type.
        3. For each cell, counts the cell types of neighbors with attention scores above the threshold.
        4. Normalizes these counts to create composition vectors (all zeros for a cell with none).
        5. Clusters the composition vectors using KMeans, ``k`` chosen by the silhouette score on a
           sample of ``silhouette_sample_size`` cells when not given.

        Parameters
        ----------
        attention_quantile_threshold
            The quantile threshold for classifying high-interacting neighbors. Defaults to 0.9 (90th percentile).
        n_clusters
            Number of clusters for KMeans. If None, will use silhouette analysis to find the optimal number
            of clusters (2-12 range).
        random_state
            Random state for KMeans clustering.
        silhouette_sample_size
            Cells on which the silhouette score is computed (it is quadratic in the number of cells).

        Returns
        -------
        :class:`pandas.DataFrame` indexed by cell obs_names: one float64 column per cell type (the
        normalised count of high-interacting neighbours of that type) and ``hub_cluster`` (int64).
        """
        self._require()
        if not 0 < attention_quantile_threshold < 1:
            raise ValueError(f"attention_quantile_threshold must be a number in (0, 1), got {attention_quantile_threshold!r}.")
        amax = self._attention.max(axis=1)  # (n, K)
        n, K = amax.shape
        C = len(self._categories)
        high = np.zeros((n, K), dtype=bool)
        for c in range(C):
            rows = np.flatnonzero(self._labels == c)
            if len(rows) == 0:
                continue
            vals = amax[rows]
            nz = vals[vals > 0]
            if nz.size == 0:
                continue
            thr = np.quantile(nz, attention_quantile_threshold)
            high[rows] = vals > thr
        key = (np.arange(n)[:, None] * C + self._nn_labels)[high]
        counts = np.bincount(key, minlength=n * C).reshape(n, C).astype(np.float64)
        totals = counts.sum(1, keepdims=True)
        comp = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        labels, k, scores = kmeans_silhouette(comp, n_clusters, sample_size=silhouette_sample_size,
                                              random_state=random_state)
        out = pd.DataFrame(comp, index=pd.Index(self._attention_patterns_df["cell_idx"].to_numpy()[:: self._attention.shape[1]],
                                                name=None), columns=self._categories)
        out["hub_cluster"] = labels
        self._hubs_df, self._hub_silhouette = out, scores
        return out
