"""``cellvi amici``: train AMICI on an h5ad file with coordinates and cell types; write the model directory."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "amici",
        help="cell-cell interactions from spatial data (AMICI)",
        description=(
            "Train cellvi.AMICI on an AnnData (.h5ad) file whose expression is log-normalised, with cell types "
            "in obs and coordinates in obsm; save the trained model directory (and, with --save-anndata, the "
            "AnnData with its neighbour tables). Prints the held-out reconstruction error against the "
            "cell-type-mean baseline."
        ),
    )
    p.add_argument("input", help="input .h5ad (or 10x .h5 / mtx directory) with coordinates and labels")
    p.add_argument("-o", "--output", required=True, help="model directory to write")
    p.add_argument("--labels-key", required=True, help="obs column with the cell types")
    p.add_argument(
        "--coord-obsm-key", default="spatial", help="obsm key of the coordinates (default: %(default)s)"
    )
    p.add_argument("--layer", default=None, help="layer with log-normalised expression (default: X)")
    p.add_argument("--cell-radius-key", default=None, help="obs column with cell radii (surface distances)")
    p.add_argument("--n-neighbors", type=int, default=30, help="neighbours per cell (default: %(default)s)")
    p.add_argument("--n-heads", type=int, default=8, help="attention heads (default: %(default)s)")
    p.add_argument("--max-epochs", type=int, default=None, help="default: min(round(20000/n_cells*400), 400)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size (default: %(default)s)")
    p.add_argument(
        "--train-size", type=float, default=0.9, help="fraction of cells to train on (default: %(default)s)"
    )
    p.add_argument(
        "--early-stopping", action="store_true", help="stop when the held-out loss stops improving"
    )
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--save-anndata", action="store_true", help="also save the AnnData in the model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from pathlib import Path

    import numpy as np
    import scvi

    from cellvi._io import read_anndata
    from cellvi.amici import AMICI

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it.")
    scvi.settings.seed = args.seed
    adata = read_anndata(args.input, arg="input")
    AMICI.setup_anndata(
        adata,
        layer=args.layer,
        labels_key=args.labels_key,
        coord_obsm_key=args.coord_obsm_key,
        cell_radius_key=args.cell_radius_key,
        n_neighbors=args.n_neighbors,
    )
    model = AMICI(adata, n_heads=args.n_heads)
    model.train(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        train_size=args.train_size,
        batch_size=args.batch_size,
        early_stopping=args.early_stopping,
        enable_progress_bar=not args.quiet,
    )
    held_out = model.validation_indices if len(model.validation_indices) else model.train_indices
    which = "held-out" if len(model.validation_indices) else "training"
    err = model.get_reconstruction_error(indices=held_out)["reconstruction_loss"]
    # the baseline predicts each cell's type mean: prediction minus residual
    means = model.get_predictions(indices=held_out, prog_bar=False) - model.get_predictions(
        indices=held_out, get_residuals=True, prog_bar=False
    )
    expr = adata.X if args.layer is None else adata.layers[args.layer]
    rows = expr[held_out]
    rows = rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)
    baseline = float(0.5 * ((rows - means) ** 2).sum(1).mean())
    model.save(str(out), overwrite=args.overwrite, save_anndata=args.save_anndata)
    print(
        f"AMICI trained on {len(model.train_indices)} cells; {which} reconstruction error "
        f"{float(err):.4f} (cell-type means: {baseline:.4f}); model saved to {out}"
    )
    return 0
