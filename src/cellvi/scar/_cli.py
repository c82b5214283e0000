"""``cellvi scar``: remove ambient RNA from a filtered droplet matrix, using the raw matrix's empty droplets."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Ambient RNA removal in droplet data (scAR; API of scvi.external.SCAR).

Each cell is modelled as a mixture of native expression and ambient RNA,
p_cg = (1 - rho_c) f_cg + rho_c a_g. The ambient profile a is estimated from the empty
droplets of the raw matrix (depth-aware test, sparse, per batch with --batch-key), the model
is trained on the filtered cells, and the denoised counts (never above the observed ones by
default) are written with the per-cell contamination fraction.

Inputs: .h5ad, 10x .h5, or a 10x mtx directory. Output: an .h5ad (written atomically) with
  layers['denoised']   denoised integer counts (sparse)
  obs['contamination'] estimated contamination fraction per cell
  obsm['X_scAR']       latent representation
  varm['ambient_profile'] the ambient profile (genes x batches)
  obs['feature_assignment'], obs['n_features']  with --feature-type guides
"""

EXAMPLE = """\
example:
  cellvi scar filtered_feature_bc_matrix.h5 raw_feature_bc_matrix.h5 -o denoised.h5ad
  cellvi scar cells.h5ad raw.h5ad -o out.h5ad --batch-key sample --gene-likelihood poisson
  cellvi scar guides.h5ad guides_raw.h5ad -o out.h5ad --feature-type guides
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scar",
        help="ambient RNA removal (scAR)",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("filtered", help="filtered matrix (cells): .h5ad, 10x .h5 or 10x mtx directory")
    p.add_argument(
        "raw", help="raw matrix (all droplets, with the empty ones): .h5ad, 10x .h5 or mtx directory"
    )
    p.add_argument("-o", "--output", required=True, help="output .h5ad (denoised counts and estimates)")
    p.add_argument("--layer", default=None, help="layer of the filtered matrix with raw counts (default: X)")
    p.add_argument("--batch-key", default=None, help="obs column with the batch/channel (in both matrices)")
    p.add_argument(
        "--feature-type",
        choices=["rna", "guides"],
        default="rna",
        help="'guides' for sgRNA / hashtag / CMO counts: sparsity 1 and per-cell feature assignment",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--gene-likelihood",
        choices=["b", "nb", "zinb", "poisson"],
        default="b",
        help="count likelihood (default: %(default)s)",
    )
    m.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="expected sparsity of native signals (default 0.9; 1 for guides)",
    )
    m.add_argument(
        "--n-latent", type=int, default=15, help="dimensionality of the latent space (default: %(default)s)"
    )
    m.add_argument("--n-hidden", type=int, default=150, help="nodes per hidden layer (default: %(default)s)")
    t = p.add_argument_group("training")
    t.add_argument("--max-epochs", type=int, default=None, help="epochs (default: scvi-tools heuristic)")
    t.add_argument("--batch-size", type=int, default=128, help="minibatch size (default: %(default)s)")
    t.add_argument("--accelerator", default="auto", help="'cpu', 'gpu' or 'auto' (default: %(default)s)")
    a = p.add_argument_group("ambient profile")
    a.add_argument(
        "--prob",
        type=float,
        default=0.995,
        help="confidence of the empty-droplet test (default: %(default)s)",
    )
    a.add_argument(
        "--min-raw-counts",
        type=int,
        default=2,
        help="ignore raw droplets with fewer counts (default: %(default)s)",
    )
    a.add_argument(
        "--sample", type=int, default=50000, help="droplets to test at most (default: %(default)s)"
    )
    d = p.add_argument_group("output")
    d.add_argument(
        "--method",
        choices=["posterior", "resynthesis"],
        default="posterior",
        help="denoising: remove ambient from observed counts, or re-synthesise (default: %(default)s)",
    )
    d.add_argument(
        "--threshold",
        default="balanced",
        help="remove a count when its posterior chance of being ambient is at least this: 'balanced' "
        "(the training contamination) or a number in (0, 1); 0.5 removes fewer native counts "
        "(default: %(default)s)",
    )
    d.add_argument(
        "--no-clip", action="store_true", help="do not clip re-synthesised counts to the observed ones"
    )
    d.add_argument(
        "--n-samples", type=int, default=1, help="posterior samples, median taken (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    if not args.output.endswith(".h5ad"):
        raise ValueError(f"--output must end with .h5ad, got {args.output!r}.")
    for name in ("max_epochs", "batch_size", "n_samples", "n_latent", "n_hidden"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}.")
    from ._removal import check_threshold

    threshold = args.threshold
    if threshold != "balanced":
        try:
            threshold = float(threshold)
        except ValueError:
            pass  # a word other than 'balanced': rejected below
    threshold = check_threshold(threshold, "--threshold", shown=args.threshold)
    say = (lambda *a: None) if args.quiet else (lambda *a: print("cellvi scar:", *a, flush=True))

    import scvi

    from cellvi._io import read_anndata, write_h5ad
    from cellvi.scar import SCAR

    scvi.settings.seed = args.seed
    say(f"reading {args.filtered} and {args.raw}")
    adata = read_anndata(args.filtered, "filtered")
    raw = read_anndata(args.raw, "raw")
    say(f"{adata.n_obs} cells x {adata.n_vars} features; {raw.n_obs} raw droplets")
    SCAR.setup_anndata(adata, batch_key=args.batch_key, layer=args.layer)
    prof = SCAR.get_ambient_profile(
        adata,
        raw,
        prob=args.prob,
        min_raw_counts=args.min_raw_counts,
        sample=args.sample,
        batch_key=args.batch_key,
        seed=args.seed,
    )
    say("ambient profile from", ", ".join(f"{k}: {v} droplets" for k, v in prof.attrs["n_cell_free"].items()))
    guides = args.feature_type == "guides"
    sparsity = args.sparsity if args.sparsity is not None else (1.0 if guides else 0.9)
    model = SCAR(
        adata,
        gene_likelihood=args.gene_likelihood,
        sparsity=sparsity,
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
    )
    say("training", model)
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        enable_progress_bar=not args.quiet,
    )
    adata.layers["denoised"] = model.get_denoised_counts(
        n_samples=args.n_samples, method=args.method, threshold=threshold, clip_to_obs=not args.no_clip
    )
    adata.obs["contamination"] = model.get_contamination_fraction()
    adata.obsm["X_scAR"] = model.get_latent_representation()
    if guides:
        assigned = model.assign_features()
        adata.obs["feature_assignment"] = assigned["feature"].astype(str)
        adata.obs["n_features"] = assigned["n_features"]
    write_h5ad(adata, Path(args.output))
    say(f"mean contamination {adata.obs['contamination'].mean():.3f}; wrote {args.output}")
    return 0
