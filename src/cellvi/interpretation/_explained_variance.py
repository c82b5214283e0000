"""Explained variance of each attention head per cell type, with a permutation test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._access import ModelData, eval_mode
from ._plotting import finish_figure, new_figure, palette_for
from ._stats import bh_adjust, min_permutations, permutation_pvalue


class AMICIExplainedVarianceModule:
    """How much of each cell type's expression each attention head explains on its own.

    For head ``h`` and cell type ``c``, the prediction keeps only head ``h``'s contribution (the
    cell-type mean and the type offset stay in): ``pred_h = mu_c + b_c + W_h z_h``. Over the cells of
    type ``c``:

    * ``expl_var_head_gene[g] = 1 - Var(pred_h - x)_g / Var(x)_g`` (0 where ``Var(x) = 0``);
    * ``expl_var_head = 1 - sum_g Var(pred_h - x)_g / sum_g Var(x)_g``.

    All heads come from one forward pass per minibatch (the model's residual is a sum over heads).
    Permutation test: the predictions are shuffled across the cells of the type and the squared error
    recomputed; ``p_value_head = (1 + #{MSE_perm <= MSE_obs}) / (1 + n_permutations)`` (never 0), and
    ``p_value_adj_head`` is the Benjamini-Hochberg adjustment over all (head, cell type) pairs. Memory
    stays bounded for large cell types: only the part of the error that changes under permutation, a
    ``n_head_size``-dimensional projection per cell and head, is kept, and the test of a type runs on
    at most ``permutation_max_cells`` of its cells (an exact test on a random subset).
    """

    def __init__(self, _adata=None, _explained_variance_df: pd.DataFrame | None = None, _compute_kwargs=None):
        self._adata = _adata
        self._explained_variance_df = _explained_variance_df
        self._compute_kwargs = _compute_kwargs or {}

    @classmethod
    def compute(
        cls,
        model,
        adata=None,
        alpha: float = 0.05,
        run_permutation_test: bool = True,
        n_permutations: int | None = None,
        *,
        batch_size: int | None = None,
        random_state: int | None = 0,
        permutation_max_cells: int | None = 2000,
        prog_bar: bool = True,
    ) -> AMICIExplainedVarianceModule:
        """Creates a DataFrame with the explained variance scores.

        Parameters
        ----------
        model
            A trained :class:`cellvi.AMICI`.
        adata
            The AnnData object.
        alpha
            The desired significance level for the explained variance of each head-cell type pair via
            permutation testing. Defaults to 0.05.
        run_permutation_test
            Whether to run the permutation test. Defaults to True.
        n_permutations
            The number of permutations to use for the permutation test. If not provided, the minimum
            number of permutations required to achieve a significance level of alpha will be used
            (after a Bonferroni split over the head-cell type pairs).
        batch_size
            Minibatch size of the forward passes.
        random_state
            Seed of the permutations.
        permutation_max_cells
            The permutation test of a cell type uses a random subset of at most this many of its cells
            (``None``: all), which bounds its time and memory; it stays an exact test (with the ``+1``
            correction) on that subset. The explained variances themselves always use all cells.
        prog_bar
            Whether to show a progress bar.

        Returns
        -------
        :class:`AMICIExplainedVarianceModule` with ``_explained_variance_df``: one row per (head, cell
        type, gene) with columns ``head``, ``ct_name``, ``gene``, ``expl_var_head_gene``,
        ``expl_var_head`` and, with the permutation test, ``p_value_head`` and ``p_value_adj_head``.
        """
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}.")
        if permutation_max_cells is not None and (
            isinstance(permutation_max_cells, bool) or not isinstance(permutation_max_cells, (int, np.integer))
            or permutation_max_cells < 2
        ):
            raise ValueError(f"permutation_max_cells must be an integer >= 2 or None, got {permutation_max_cells!r}.")
        if n_permutations is not None and (
            isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 1
        ):
            raise ValueError(f"n_permutations must be an integer >= 1 or None, got {n_permutations!r}.")
        data = ModelData(model, adata)
        keys = data.keys
        H, C, G = data.n_heads, data.n_labels, data.store.n_genes
        dev = data.device
        basis = _head_bases(data.module, H, G, dev) if run_permutation_test else None
        z64 = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
        sx, sxx = z64(C, G), z64(C, G)
        se, see = z64(C, H, G), z64(C, H, G)
        counts = z64(C)
        proj_r, proj_x, lab_parts = [], [], []
        idx_all = data.spatial_order(np.arange(len(data.obs_names)))
        with eval_mode(data.module):
            for batch in data.batches(idx_all, data.batch_size(batch_size), prog_bar, "explained variance"):
                _, gen = data.forward(batch)
                x = batch[keys.X].double()
                lab = batch[keys.LABELS].reshape(-1)
                hr = gen[keys.HEAD_RESIDUALS].double()  # (B, H, G)
                const = gen[keys.PREDICTION].double() - hr.sum(1)  # mu_c + b_c
                err = const[:, None, :] + hr - x[:, None, :]  # (B, H, G)
                sx.index_add_(0, lab, x)
                sxx.index_add_(0, lab, x * x)
                se.index_add_(0, lab, err)
                see.index_add_(0, lab, err * err)
                counts.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
                if basis is not None:
                    proj_r.append(torch.einsum("bhg,hgd->bhd", hr, basis).float().cpu())
                    proj_x.append(torch.einsum("bg,hgd->bhd", x, basis).float().cpu())
                    lab_parts.append(lab.cpu())
        n = counts.clamp(min=1)[:, None]
        var_x = (sxx - sx * sx / n) / n  # (C, G)
        var_e = (see - se * se / n[:, None]) / n[:, None]  # (C, H, G)
        vx = var_x[:, None, :].expand_as(var_e)
        ev_gene = torch.where(vx > 0, 1 - var_e / torch.where(vx > 0, vx, 1), torch.zeros_like(var_e))
        tot_x = var_x.sum(-1, keepdim=True)  # (C, 1)
        ev_head = torch.where(tot_x > 0, 1 - var_e.sum(-1) / torch.where(tot_x > 0, tot_x, 1), torch.zeros_like(tot_x))
        ev_gene, ev_head = ev_gene.cpu().numpy(), ev_head.cpu().numpy()  # (C, H, G), (C, H)
        present = counts.cpu().numpy() > 0
        pvals = None
        if run_permutation_test:
            n_perm = n_permutations or min_permutations(H * int(present.sum()), alpha)
            pvals = _permutation_pvalues(
                torch.cat(proj_r), torch.cat(proj_x), torch.cat(lab_parts).numpy(), C, n_perm, random_state, prog_bar,
                max_cells=permutation_max_cells,
            )  # (C, H)
        # assemble (head, ct, gene) rows, head-major like the original
        cts = np.flatnonzero(present)
        h_idx, c_idx, g_idx = np.meshgrid(np.arange(H), cts, np.arange(G), indexing="ij")
        df = pd.DataFrame(
            {
                "head": h_idx.ravel().astype(np.int64),
                "ct_name": pd.Categorical(data.categories[c_idx.ravel()], categories=list(data.categories)),
                "gene": np.asarray(data.var_names)[g_idx.ravel()],
                "expl_var_head_gene": ev_gene[c_idx.ravel(), h_idx.ravel(), g_idx.ravel()],
                "expl_var_head": ev_head[c_idx.ravel(), h_idx.ravel()],
            }
        )
        if pvals is not None:
            p = pvals[cts].T  # (H, n_ct)
            p_adj = bh_adjust(p.ravel()).reshape(p.shape)
            df["p_value_head"] = np.repeat(p.ravel(), G)
            df["p_value_adj_head"] = np.repeat(p_adj.ravel(), G)
        kwargs = {"alpha": alpha, "run_permutation_test": run_permutation_test, "n_permutations": n_permutations,
                  "random_state": random_state, "permutation_max_cells": permutation_max_cells}
        return cls(data.adata, _explained_variance_df=df, _compute_kwargs=kwargs)

    # ------------------------------------------------------------------ summaries
    @property
    def explained_variance(self) -> pd.DataFrame:
        """The scores (a copy of ``_explained_variance_df``)."""
        return self._explained_variance_df.copy()

    def head_summary(self) -> pd.DataFrame:
        """One row per (head, cell type): ``expl_var_head`` and, if computed, the p-values."""
        cols = [c for c in ("head", "ct_name", "expl_var_head", "p_value_head", "p_value_adj_head")
                if c in self._explained_variance_df.columns]
        return self._explained_variance_df[cols].drop_duplicates(["head", "ct_name"]).reset_index(drop=True)

    def compute_max_explained_variance_head(self, cell_type: str) -> int:
        """The head whose best gene has the largest explained variance for ``cell_type``."""
        df = self._explained_variance_df
        sub = df[df["ct_name"] == cell_type]
        if sub.empty:
            raise ValueError(f"cell_type={cell_type!r} has no explained-variance scores; expected one of "
                             f"{list(df['ct_name'].unique())}.")
        return int(sub.groupby("head")["expl_var_head_gene"].max().idxmax())

    def max_explained_variance_heads(self, by: str = "gene") -> pd.Series:
        """The head explaining most variance for every cell type.

        Parameters
        ----------
        by
            ``"gene"``: the head with the largest best-gene explained variance (as
            :meth:`compute_max_explained_variance_head`); ``"total"``: the largest ``expl_var_head``.

        Returns
        -------
        :class:`pandas.Series` (int64) indexed by cell type.
        """
        if by not in ("gene", "total"):
            raise ValueError(f"by must be 'gene' or 'total', got {by!r}.")
        col = "expl_var_head_gene" if by == "gene" else "expl_var_head"
        best = self._explained_variance_df.groupby(["ct_name", "head"], observed=True)[col].max().unstack("head")
        return best.idxmax(axis=1).astype(np.int64).rename("head")

    def save(self, save_path) -> None:
        """Save the explained-variance scores to a CSV file (written atomically)."""
        from cellvi._io import atomic_path

        with atomic_path(save_path) as tmp:
            self._explained_variance_df.to_csv(tmp, index=False)

    # ------------------------------------------------------------------ plots
    def plot_explained_variance_barplot(
        self,
        palette=None,
        cell_type_sub=None,
        wandb_log: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Bar plot of ``expl_var_head`` per head, one bar per cell type; ``*`` marks adjusted p < 0.05."""
        import seaborn as sns

        summ = self.head_summary()
        if cell_type_sub is not None:
            summ = summ[summ["ct_name"].isin(list(cell_type_sub))]
        cts = [c for c in summ["ct_name"].cat.categories if (summ["ct_name"] == c).any()]
        summ = summ.assign(ct_name=summ["ct_name"].cat.remove_unused_categories())
        fig, ax = new_figure(1, 1, width=max(5, 0.5 * summ["head"].nunique() * max(len(cts), 1) / 2 + 3), height=4)
        a = ax[0, 0]
        sns.barplot(data=summ, x="head", y="expl_var_head", hue="ct_name", palette=palette_for(cts, palette), ax=a)
        if "p_value_adj_head" in summ.columns:
            n_ct = len(cts)
            for k, (_, row) in enumerate(summ.sort_values(["ct_name", "head"]).iterrows()):
                if row["p_value_adj_head"] < 0.05:
                    ci, h = cts.index(row["ct_name"]), int(row["head"])
                    xpos = sorted(summ["head"].unique()).index(h) - 0.4 + 0.8 * (ci + 0.5) / n_ct
                    a.text(xpos, row["expl_var_head"], "*", ha="center", va="bottom")
        a.set(ylabel="explained variance", title="explained variance per head")
        a.legend(title="cell type", frameon=False)
        return finish_figure(fig, "explained_variance_barplot", show=show, save_png=save_png, save_svg=save_svg,
                             save_dir=save_dir, wandb_log=wandb_log)

    def plot_featurewise_explained_variance_heatmap(
        self,
        cell_type_sub=None,
        n_top_genes: int = 20,
        wandb_log: bool = False,
        show: bool = True,
        save_png: bool = False,
        save_svg: bool = False,
        save_dir: str = "./figures",
    ):
        """Heatmap of ``expl_var_head_gene`` ((cell type, head) x top genes)."""
        import seaborn as sns

        df = self._explained_variance_df
        if cell_type_sub is not None:
            df = df[df["ct_name"].isin(list(cell_type_sub))]
        if df.empty:
            raise ValueError("cell_type_sub selects no cell type with scores.")
        mat = df.pivot_table(index=["ct_name", "head"], columns="gene", values="expl_var_head_gene", observed=True)
        top = mat.max(axis=0).sort_values(ascending=False).index[:n_top_genes]
        mat = mat[top]
        mat.index = [f"{c} / head {h}" for c, h in mat.index]
        fig, ax = new_figure(1, 1, width=max(5, 0.35 * mat.shape[1] + 2.5), height=max(3, 0.3 * mat.shape[0] + 1.5))
        sns.heatmap(mat, ax=ax[0, 0], cmap="viridis", cbar_kws={"label": "explained variance"})
        ax[0, 0].set(xlabel="gene", ylabel="")
        return finish_figure(fig, "featurewise_explained_variance_heatmap", show=show, save_png=save_png,
                             save_svg=save_svg, save_dir=save_dir, wandb_log=wandb_log)


def _head_bases(module, H: int, G: int, device) -> torch.Tensor:
    """(H, G, D) orthonormal bases of the spaces each head writes into (identity when unknown).

    A head's residual ``W_h z`` lies in the row space of its read-out ``W_h`` (``n_head_size x G``), so
    inner products with it only need the projection of the other vector onto that space.
    """
    w = getattr(module, "head_out", None)
    if isinstance(w, torch.Tensor) and w.dim() == 3 and w.shape[0] == H and w.shape[2] == G and w.shape[1] < G:
        q, _ = torch.linalg.qr(w.detach().double().transpose(1, 2))  # (H, G, D)
        return q.to(device)
    return torch.eye(G, dtype=torch.float64, device=device).expand(H, G, G)


def _permutation_pvalues(
    proj_r, proj_x, labels, n_labels, n_perm, random_state, prog_bar, max_elements=4_000_000, max_cells=None
):
    """(C, H) permutation p-values of ``MSE_obs`` against row-shuffled predictions, per cell type.

    Under a permutation ``pi`` of the cells of a type, ``sum_i |pred_pi(i) - x_i|^2`` changes only through
    ``T(pi) = sum_i <r_pi(i), x_i>`` (the squared norms are invariant), and ``MSE_perm <= MSE_obs`` iff
    ``T(pi) >= T(id)``; ``T`` only needs the projections ``proj_r``, ``proj_x`` (n, H, D). For types small
    enough, the (H, n, n) matrix of all inner products is formed once and each permutation is a gather of
    n entries; otherwise each permutation gathers the (n, H, D) projections, in bounded-memory chunks.
    """
    from scvi.utils import track

    gen = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
    out = np.full((n_labels, proj_r.shape[1]), np.nan)
    for c in track(range(n_labels), description="permutation test", disable=not prog_bar, style="tqdm"):
        rows = np.flatnonzero(labels == c)
        if max_cells is not None and len(rows) > max_cells:
            pick = torch.randperm(len(rows), generator=gen)[:max_cells].numpy()
            rows = np.sort(rows[pick])
        if len(rows) < 2:
            if len(rows):
                out[c] = 1.0
            continue
        r = proj_r[rows].float()
        x = proj_x[rows].float()
        r = r - r.mean(0)
        x = x - x.mean(0)
        n, H, D = r.shape
        t_obs = torch.einsum("nhd,nhd->h", r.double(), x.double()).float()
        tol = 1e-5 * float(r.norm() * x.norm())
        n_ge = torch.zeros(H, dtype=torch.float64)
        gram = H * n * n <= max_elements * 8
        if gram:
            M = torch.einsum("ihd,jhd->hij", r, x).reshape(H, n * n)  # M[h, i, j] = <r_i, x_j>
            chunk = max(1, max_elements // (n * H))
        else:
            r_h = r.permute(1, 0, 2).contiguous()  # (H, n, D)
            x_h = x.permute(1, 0, 2).reshape(H, n * D, 1)
            chunk = max(1, max_elements // (n * H * D))
        cols = torch.arange(n)
        for s in range(0, n_perm, chunk):
            m = min(chunk, n_perm - s)
            perm = torch.argsort(torch.rand(m, n, generator=gen), dim=1)  # (m, n): pi(i)
            if gram:
                t = M[:, perm * n + cols].sum(-1).T  # (m, H): sum_i M[h, pi(i), i]
            else:  # gather the permuted rows per head, then one batched matrix-vector product
                g = r_h.index_select(1, perm.reshape(-1)).reshape(H, m, n * D)
                t = torch.bmm(g, x_h).squeeze(-1).T  # (m, H)
            n_ge += (t >= t_obs[None] - tol).sum(0).double()
        out[c] = permutation_pvalue(n_ge.numpy(), n_perm)
    return out
