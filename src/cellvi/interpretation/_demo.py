"""Demo section for :mod:`cellvi.interpretation`: who talks to whom, and over what distance, in a simulated tissue.

Reuses the model and tissue written by the ``amici`` demo section when they are there (``<out>/../amici``),
otherwise trains one. Prints the sender x receiver interaction weights and the recovered length scales
against the planted ones, and writes the interaction graph, the weight heatmap and the length-scale plots.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_KWARGS = dict(
    n_heads=4, n_head_size=16, n_query_dim=32, n_query_embed_hidden=64,
    n_nn_embed=64, n_nn_embed_hidden=128, n_kv_dim=64, n_pos_coef_mlp_hidden=32,
)  # fmt: skip


def _model_and_tissue(out_dir: Path, quick: bool):
    import anndata as ad
    import scvi

    from cellvi.amici import AMICI
    from cellvi.data import simulate_spatial

    amici_dir = out_dir.parent / "amici"
    if (amici_dir / "model").is_dir() and (amici_dir / "tissue.h5ad").exists():
        tissue = ad.read_h5ad(amici_dir / "tissue.h5ad")
        model = AMICI.load(str(amici_dir / "model"), adata=tissue)
        print(f"using the model and tissue of the amici demo section ({amici_dir})")
        return model, tissue
    scvi.settings.seed = 0
    n_cells, epochs = (1500, 25) if quick else (3000, 30)
    tissue = simulate_spatial(n_cells=n_cells, n_genes=100, seed=0)
    AMICI.setup_anndata(tissue, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=20)
    model = AMICI(tissue, **DEMO_MODEL_KWARGS)
    print(f"training AMICI on {tissue.n_obs} simulated cells for {epochs} epochs ...")
    model.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
    return model, tissue


def run(out_dir: Path, quick: bool) -> None:
    import pandas as pd

    from cellvi._io import atomic_path
    from cellvi.interpretation import (
        AMICIAblationModule,
        AMICICounterfactualAttentionModule,
        AMICIExplainedVarianceModule,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tissue = _model_and_tissue(out_dir, quick)
    planted = tissue.uns["interactions"]
    print("planted interactions:")
    print(planted[["sender", "receiver", "length_scale", "sign"]].to_string(index=False))

    ablation = AMICIAblationModule.compute(model, adata=tissue, compute_z_value=True, prog_bar=False)
    weights = ablation.get_interaction_weight_matrix(weight="ablation")
    counts = ablation.get_interaction_weight_matrix()
    print("\nsender x receiver interaction weight (squared error explained by the sender type, significant genes):")
    print(weights.round(3).to_string())
    print("\nnumber of significantly changed genes (adjusted p < 0.05):")
    print(counts.to_string())
    threshold = 0.2 * float(weights.to_numpy().max())
    ablation.plot_interaction_directed_graph(weight="ablation", weight_threshold=threshold, show=False,
                                             save_png=True, save_dir=out_dir)
    ablation.plot_interaction_weight_heatmap(weight="ablation", show=False, save_png=True, save_dir=out_dir)

    expl_var = AMICIExplainedVarianceModule.compute(model, adata=tissue, prog_bar=False)
    rows = []
    for inter in planted.itertuples():
        head = expl_var.compute_max_explained_variance_head(inter.receiver)
        cf = AMICICounterfactualAttentionModule.compute(model, inter.receiver, adata=tissue, prog_bar=False)
        ci = cf.length_scale_confidence_intervals(head_idxs=[head], sender_types=[inter.sender], n_bootstrap=2000)
        est, lo, hi = ci[["estimate", "ci_low", "ci_high"]].iloc[0]
        rows.append({"sender": inter.sender, "receiver": inter.receiver, "head": head,
                     "planted_length_scale": inter.length_scale, "recovered_length_scale": est,
                     "ci_low": lo, "ci_high": hi})
        cf.plot_length_scale_distribution(head_idxs=[head], show=False, save_png=True, save_dir=out_dir,
                                          true_length_scale=inter.length_scale)
        cf.plot_counterfactual_attention_summary(head, list(range(0, 61, 2)), show=False, save_png=True,
                                                 save_dir=out_dir)
    table = pd.DataFrame(rows)
    print("\ninteraction length scales (median over senders, 95% bootstrap CI, head explaining most variance):")
    print(table.round(2).to_string(index=False))
    with atomic_path(out_dir / "length_scales.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "interaction_weights.csv") as tmp:
        weights.to_csv(tmp)
    print(f"wrote {out_dir}/interaction_directed_graph.png, interaction_weight_heatmap.png, length_scales_*.png, "
          "counterfactual_attention_*.png, length_scales.csv, interaction_weights.csv")
