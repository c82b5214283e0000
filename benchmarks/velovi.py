"""cellvi.VELOVI against scvi.external.VELOVI: same data, same settings, one process, one torch thread.

Prints ground-truth quality (on cellvi.data.simulate_velocity), training throughput and the time of
get_directional_uncertainty / get_permutation_scores, with cellvi / original ratios.

    .venv/bin/python benchmarks/velovi.py                 # 1000 cells x 50 genes, 200 epochs
    .venv/bin/python benchmarks/velovi.py --n-obs 3000 --n-vars 100 --max-epochs 300

Timings are wall-clock and CPU (process) time; on a shared machine, CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np


def _timed(fn, *args, **kwargs):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def _quality(model, adata, n_samples: int) -> dict[str, float]:
    import torch
    from scipy.stats import pearsonr, spearmanr

    torch.manual_seed(0)
    t = model.get_latent_time(n_samples=n_samples).to_numpy()
    v = model.get_velocity(n_samples=n_samples).to_numpy()
    pi, _ = model.get_state_assignment(n_samples=n_samples)
    truth_v = adata.layers["true_velocity"]
    moving = np.abs(truth_v) > 0.1 * np.abs(truth_v).max(axis=0)
    state = adata.layers["true_state"]
    clear = (state == 0) | (state == 2)
    scale = np.where(t.max(0) > 0, 20.0 / np.where(t.max(0) > 0, t.max(0), 1.0), 1.0)
    cell_time = np.median(t * scale, axis=1)
    rates = model.get_rates()
    ratio = (
        rates["gamma"]
        / rates["beta"]
        * adata.var["velovi_unspliced_range"]
        / adata.var["velovi_spliced_range"]
    )
    per_gene = [pearsonr(v[:, g], truth_v[:, g])[0] for g in range(adata.n_vars)]
    return {
        "latent time Spearman (cell median)": spearmanr(cell_time, adata.obs["true_time"])[0],
        "velocity sign agreement (moving)": (np.sign(v) == np.sign(truth_v))[moving].mean(),
        "velocity Pearson per gene (median)": float(np.nanmedian(per_gene)),
        "induction/repression accuracy": ((pi[..., :2].sum(-1) > 0.5) == (state <= 1))[clear].mean(),
        "gamma/beta Pearson (unscaled)": pearsonr(ratio, adata.var["true_gamma"] / adata.var["true_beta"])[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-obs", type=int, default=1000)
    parser.add_argument("--n-vars", type=int, default=50)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--n-samples", type=int, default=25, help="posterior samples for the quality metrics")
    parser.add_argument("--uncertainty-samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # a benchmark script, not library code: keep its output readable
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    import scvi
    from scvi.external import VELOVI as Original

    import cellvi
    from cellvi.velovi import compute_moments, preprocess_data

    adata = cellvi.data.simulate_velocity(n_obs=args.n_obs, n_vars=args.n_vars, seed=args.seed)
    compute_moments(adata, n_neighbors=30, normalize=False)
    adata = preprocess_data(adata, filter_on_r2=False)
    print(
        f"data: {adata.n_obs} cells x {adata.n_vars} genes (simulate_velocity seed {args.seed}); "
        f"torch threads {torch.get_num_threads()}; max_epochs {args.max_epochs}, batch 256, other defaults"
    )

    results = {}
    for name, cls in (("cellvi", cellvi.VELOVI), ("original", Original)):
        data = adata.copy()
        cls.setup_anndata(data, spliced_layer="Ms", unspliced_layer="Mu")
        scvi.settings.seed = args.seed
        model = cls(data)
        _, wall, cpu = _timed(model.train, max_epochs=args.max_epochs, enable_progress_bar=False)
        epochs = len(model.history["elbo_train"])
        n_train = len(model.train_indices)
        res = {
            "epochs": epochs,
            "train_wall": wall,
            "train_cpu": cpu,
            "cells_per_s_cpu": n_train * epochs / cpu,
        }
        res["quality"] = _quality(model, data, args.n_samples)
        torch.manual_seed(0)
        _, res["unc_wall"], res["unc_cpu"] = _timed(
            model.get_directional_uncertainty, n_samples=args.uncertainty_samples
        )
        _, res["perm_wall"], res["perm_cpu"] = _timed(model.get_permutation_scores, labels_key="cell_type")
        results[name] = res
        print(f"  {name}: trained {epochs} epochs in {wall:.1f}s wall / {cpu:.1f}s CPU", flush=True)

    new, old = results["cellvi"], results["original"]
    print("\nground truth (higher is better)          cellvi   original")
    for key in new["quality"]:
        print(f"  {key:38s} {new['quality'][key]:7.3f}   {old['quality'][key]:7.3f}")
    print("\nspeed                                     cellvi   original   ratio")
    rows = [
        ("training s/epoch (CPU)", new["train_cpu"] / new["epochs"], old["train_cpu"] / old["epochs"]),
        ("training s/epoch (wall)", new["train_wall"] / new["epochs"], old["train_wall"] / old["epochs"]),
        ("get_directional_uncertainty s (wall)", new["unc_wall"], old["unc_wall"]),
        ("get_directional_uncertainty s (CPU)", new["unc_cpu"], old["unc_cpu"]),
        ("get_permutation_scores s (wall)", new["perm_wall"], old["perm_wall"]),
        ("get_permutation_scores s (CPU)", new["perm_cpu"], old["perm_cpu"]),
    ]
    for label, a, b in rows:
        print(f"  {label:38s} {a:7.3f}   {b:7.3f}   {b / a:5.1f}x")
    print(
        "  (the original's uncertainty runs joblib over all cores, n_jobs=-1; its CPU time misses the workers)"
    )


if __name__ == "__main__":
    main()
