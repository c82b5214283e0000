"""``cellvi velovi``: h5ad with spliced/unspliced layers in, h5ad with velocity, latent time and uncertainty out."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "velovi",
        help="RNA velocity by variational inference (veloVI).",
        description=(
            "Read an h5ad file with spliced and unspliced count layers, compute kNN moments, scale and filter "
            "genes, train VELOVI and write an h5ad file with layers['velocity'], layers['fit_t'], "
            "obs['velovi_latent_time'] and obs['velocity_uncertainty'] (plus scVelo's fit_* columns)."
        ),
    )
    p.add_argument("input", help="input .h5ad file")
    p.add_argument("-o", "--output", required=True, help="output .h5ad file (written atomically)")
    p.add_argument(
        "--spliced-layer", default="spliced", help="layer with spliced counts (default: %(default)s)"
    )
    p.add_argument(
        "--unspliced-layer", default="unspliced", help="layer with unspliced counts (default: %(default)s)"
    )
    p.add_argument(
        "--moments-given",
        action="store_true",
        help="the layers already hold smoothed abundances (e.g. Ms/Mu); skip the kNN moments",
    )
    p.add_argument(
        "--n-neighbors", type=int, default=30, help="neighbours for the moments (default: %(default)s)"
    )
    p.add_argument(
        "--n-pcs", type=int, default=30, help="principal components for the graph (default: %(default)s)"
    )
    p.add_argument(
        "--no-normalize", action="store_true", help="do not normalise the layers by their per-cell totals"
    )
    p.add_argument("--no-filter", action="store_true", help="keep genes that fail the steady-state r2 filter")
    p.add_argument("--max-epochs", type=int, default=500, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument(
        "--n-samples", type=int, default=25, help="posterior samples for the outputs (default: %(default)s)"
    )
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--save-model", default=None, help="also save the trained model to this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    import scvi

    from cellvi._io import atomic_path, read_anndata, write_h5ad
    from cellvi.velovi import VELOVI, compute_moments, preprocess_data, write_velovi_results

    scvi.settings.seed = args.seed
    adata = read_anndata(args.input, arg="input")
    if args.moments_given:
        s_layer, u_layer = args.spliced_layer, args.unspliced_layer
    else:
        compute_moments(
            adata,
            spliced_layer=args.spliced_layer,
            unspliced_layer=args.unspliced_layer,
            n_neighbors=args.n_neighbors,
            n_pcs=args.n_pcs,
            normalize=not args.no_normalize,
        )
        s_layer, u_layer = "Ms", "Mu"
    adata = preprocess_data(
        adata, spliced_layer=s_layer, unspliced_layer=u_layer, filter_on_r2=not args.no_filter
    )
    VELOVI.setup_anndata(adata, spliced_layer=s_layer, unspliced_layer=u_layer)
    model = VELOVI(adata)
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        enable_progress_bar=not args.quiet,
    )
    write_velovi_results(model, adata, n_samples=args.n_samples)
    if args.save_model:
        with atomic_path(args.save_model) as tmp:
            model.save(str(tmp), overwrite=True)
    write_h5ad(adata, args.output)
    if not args.quiet:
        print(f"cellvi velovi: {adata.n_obs} cells x {adata.n_vars} genes; wrote {args.output}")
    return 0
