"""``cellvi fadvi``: train FADVI on an h5ad file; write the embeddings, label predictions and the model."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fadvi",
        help="batch / label / residual disentanglement and label transfer (FADVI)",
        description=(
            "Train cellvi.FADVI on raw counts with a batch column and a label column (cells without a label "
            "marked with --unlabeled-category). Writes an .h5ad with obsm['X_fadvi_b'|'X_fadvi_l'|'X_fadvi_r'] "
            "and obs['fadvi_prediction'] / obs['fadvi_confidence'], and optionally the model directory. "
            "Prints the label accuracy on held-out labeled cells and the leakage table of fresh probes."
        ),
    )
    p.add_argument("input", help="input .h5ad (or 10x .h5 / mtx directory) with raw counts")
    p.add_argument("-o", "--output", required=True, help="output .h5ad (written atomically)")
    p.add_argument("--labels-key", required=True, help="obs column with the labels")
    p.add_argument("--batch-key", default=None, help="obs column with the batches (default: one batch)")
    p.add_argument("--unlabeled-category", default="Unknown", help="label of unlabeled cells (default: %(default)s)")
    p.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    p.add_argument("--categorical-covariate-keys", nargs="+", default=None, help="extra categorical nuisance columns")
    p.add_argument("--continuous-covariate-keys", nargs="+", default=None, help="extra continuous nuisance columns")
    p.add_argument("--gene-likelihood", default="zinb", choices=("zinb", "nb", "poisson"))
    p.add_argument("--max-epochs", type=int, default=None, help="default: min(round(20000/n_cells*400), 400)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size (default: %(default)s)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--save-model", default=None, help="also save the trained model to this directory")
    p.add_argument("--no-evaluate", action="store_true", help="skip the leakage probes")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from pathlib import Path

    import numpy as np
    import scvi

    from cellvi._io import read_anndata, write_h5ad
    from cellvi.fadvi import FADVI, evaluate_disentanglement

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it.")
    if args.save_model and Path(args.save_model).exists() and not args.overwrite:
        raise FileExistsError(f"{args.save_model} already exists; pass --overwrite to replace it.")
    scvi.settings.seed = args.seed
    adata = read_anndata(args.input, arg="input")
    FADVI.setup_anndata(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        unlabeled_category=args.unlabeled_category,
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys,
    )
    model = FADVI(adata, gene_likelihood=args.gene_likelihood)
    model.train(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        batch_size=args.batch_size,
        enable_progress_bar=not args.quiet,
    )
    for k in ("b", "l", "r"):
        adata.obsm[f"X_fadvi_{k}"] = model.get_latent_representation(representation=k)
    probs = model.predict(soft=True, return_numpy=False)
    adata.obs["fadvi_prediction"] = probs.idxmax(axis=1).astype("category")
    adata.obs["fadvi_confidence"] = probs.max(axis=1).to_numpy(dtype=np.float32)

    labels = adata.obs[args.labels_key].astype(str).to_numpy()
    held = np.asarray(model.validation_indices, dtype=int)
    held = held[labels[held] != args.unlabeled_category] if held.size else held
    if held.size:
        acc = float(np.mean(adata.obs["fadvi_prediction"].astype(str).to_numpy()[held] == labels[held]))
        print(f"FADVI: label accuracy on {held.size} held-out labeled cells: {acc:.3f}")
    if not args.no_evaluate:
        table = evaluate_disentanglement(model)
        print("Leakage (fresh probes on held-out cells; balanced accuracy, chance in 'chance'):")
        print(table[["latent", "target", "chance", "score"]].round(3).to_string(index=False))
    for key in [k for k in adata.obs.columns if k.startswith("_scvi")]:
        del adata.obs[key]
    adata.uns.pop("_scvi_uuid", None)
    adata.uns.pop("_scvi_manager_uuid", None)
    write_h5ad(adata, out)
    if args.save_model:
        model.save(args.save_model, overwrite=args.overwrite)
    print(f"wrote {out}" + (f" and the model to {args.save_model}" if args.save_model else ""))
    return 0
