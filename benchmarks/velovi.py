"""cellvi.VELOVI against scvi.external.VELOVI: same data, same settings, one process, one torch thread.

Prints ground-truth quality (on cellvi.data.simulate_velocity), training throughput, peak memory growth
of training and the time of get_directional_uncertainty / get_permutation_scores, with original / cellvi
ratios (> 1: cellvi is faster); ``--json PATH`` also writes them (``benchmarks/_common.Report``)::

    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/velovi.py   # 1000 cells x 50 genes, 200 epochs
    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/velovi.py --json benchmarks/results/velovi.json
    .venv/bin/python benchmarks/velovi.py --n-obs 3000 --n-vars 100 --max-epochs 300

Both models get the same data, seed, epochs, batch size (256), posterior samples and the rest of their
defaults; each is warmed up by one epoch first. Ground-truth quality is the mean over ``--quality-seeds``
simulated datasets (default 8, seeds ``--seed`` onwards; one model per side and seed), with the paired
differences and their standard errors: on one dataset a metric moved by up to 0.04 between two cellvi
versions that differed only in float rounding. Each side trains ``--train-repeats`` fresh models
(default 5; one 200-epoch training of cellvi took 9-14 s CPU in one session's runs), and the post-hoc
methods run ``--repeats`` times each (default 5) after all models are trained; the two sides alternate,
the order swaps every round, and medians are reported, so that load changes hit both sides. Timings are
wall-clock and CPU (process) time; on a shared machine, CPU time is the steadier figure. Directional uncertainty runs with ``n_jobs=1`` on both sides by default (one thread each, so that
CPU time counts all the work; the original's default ``n_jobs=-1`` starts joblib worker processes whose
CPU time the parent does not see): ``--uncertainty-n-jobs -1`` runs the page's default instead.
Both sides run with the glibc heap thresholds that cellvi's training sets for its process
(``_common.same_allocator``, set before anything is timed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Report, add_json_argument, alternating, measure, paired_difference, same_allocator

#: Direction of every quality metric (all are agreement with the simulated truth).
_BETTER = "higher"


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
    parser.add_argument(
        "--uncertainty-n-jobs", type=int, default=1, help="n_jobs of get_directional_uncertainty (both)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=5, help="calls of each post-hoc method per model (medians reported)"
    )
    parser.add_argument("--train-repeats", type=int, default=5, help="trainings per model (medians reported)")
    parser.add_argument(
        "--quality-seeds",
        type=int,
        default=8,
        help="simulated datasets (seeds --seed, --seed + 1, ...) whose mean quality is compared",
    )
    add_json_argument(parser)
    args = parser.parse_args()
    same_allocator()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for flag in ("train_repeats", "quality_seeds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    report = Report(
        "velovi",
        settings={
            "n_obs": args.n_obs,
            "n_vars": args.n_vars,
            "max_epochs": args.max_epochs,
            "batch_size": 256,
            "quality_n_samples": args.n_samples,
            "uncertainty_n_samples": args.uncertainty_samples,
            "uncertainty_n_jobs": args.uncertainty_n_jobs,
            "permutation_n_samples": 10,
            "seed": args.seed,
            "repeats": args.repeats,
            "train_repeats": args.train_repeats,
            "quality_seeds": args.quality_seeds,
            "threads": 1,
        },
    )

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

    def simulate(seed: int):
        data = cellvi.data.simulate_velocity(n_obs=args.n_obs, n_vars=args.n_vars, seed=seed)
        compute_moments(data, n_neighbors=30, normalize=False)
        return preprocess_data(data, filter_on_r2=False)

    adata = simulate(args.seed)
    print(
        f"data: {adata.n_obs} cells x {adata.n_vars} genes (simulate_velocity seed {args.seed}); "
        f"torch threads {torch.get_num_threads()}; max_epochs {args.max_epochs}, batch 256, other defaults; "
        f"uncertainty n_samples {args.uncertainty_samples}, n_jobs {args.uncertainty_n_jobs}"
    )

    models = {"cellvi": cellvi.VELOVI, "original": Original}

    def fresh_model(cls, source=adata, seed=args.seed):
        data = source.copy()
        cls.setup_anndata(data, spliced_layer="Ms", unspliced_layer="Mu")
        scvi.settings.seed = seed
        return cls(data), data

    # warm-up: one epoch of each, so that neither side pays the first call's imports and allocations
    for cls in models.values():
        fresh_model(cls)[0].train(max_epochs=1, enable_progress_bar=False)

    # training: --train-repeats fresh models per side (same seed), the two sides alternating and the order
    # swapped every round, medians reported; the first model of each side is kept for the quality metrics
    # and the post-hoc methods
    results = {name: {"train": []} for name in models}
    for _, name, cls in alternating(models, args.train_repeats):
        model, data = fresh_model(cls)
        m = measure(lambda model=model: model.train(max_epochs=args.max_epochs, enable_progress_bar=False))
        res = results[name]
        epochs = len(model.history["elbo_train"])  # early stopping is on (both sides' default)
        res["train"].append((m.wall_s, m.cpu_s, m.peak_mb, epochs))
        print(f"  {name}: trained {epochs} epochs in {m.wall_s:.1f}s wall / {m.cpu_s:.1f}s CPU", flush=True)
        if "model" not in res:
            res["model"], res["data"] = model, data
    for name, res in results.items():
        model = res["model"]
        res["epochs"] = len(model.history["elbo_train"])
        res["n_train"] = len(model.train_indices)
        # medians of the time per epoch (runs could stop early at different epochs), times the first run's
        # epochs for the totals
        res["train_wall"] = float(np.median([t[0] / t[3] for t in res["train"]])) * res["epochs"]
        res["train_cpu"] = float(np.median([t[1] / t[3] for t in res["train"]])) * res["epochs"]
        res["train_cpu_all"] = [round(t[1], 2) for t in res["train"]]
        res["train_peak_mb"] = max(t[2] for t in res["train"])
        res["quality"] = {args.seed: _quality(model, res["data"], args.n_samples)}

    # quality on further seeds (new data and training seed each; untimed): one seed's metrics move by up to
    # 0.04 with float-rounding changes to training, so both models are judged on the means over seeds
    quality_seeds = [args.seed + i for i in range(args.quality_seeds)]
    for seed in quality_seeds[1:]:
        data_s = simulate(seed)
        for name, cls in models.items():
            model, data = fresh_model(cls, data_s, seed)
            model.train(max_epochs=args.max_epochs, enable_progress_bar=False)
            results[name]["quality"][seed] = _quality(model, data, args.n_samples)
        print(f"  quality seed {seed} done", flush=True)
    report.note(
        f"training times are medians of {args.train_repeats} trainings per model (fresh model, same seed), the "
        "two models alternating (order swapped every round); CPU s per training: "
        + "; ".join(f"{name} {res['train_cpu_all']}" for name, res in results.items())
    )

    # post-hoc methods: each call timed --repeats times, the two models alternating (so that load changes hit
    # both sides), medians reported; both trained models exist by now, so every call runs in the same process
    # state
    calls = {
        "unc": lambda model: model.get_directional_uncertainty(
            n_samples=args.uncertainty_samples, n_jobs=args.uncertainty_n_jobs
        ),
        "perm": lambda model: model.get_permutation_scores(labels_key="cell_type"),
    }
    for key, call in calls.items():
        times = {name: [] for name in results}
        for _, name, res in alternating(results, args.repeats):
            torch.manual_seed(0)
            m = measure(lambda call=call, model=res["model"]: call(model))
            times[name].append((m.wall_s, m.cpu_s))
        for name, res in results.items():
            res[f"{key}_wall"] = float(np.median([t[0] for t in times[name]]))
            res[f"{key}_cpu"] = float(np.median([t[1] for t in times[name]]))
            res[f"{key}_cpu_all"] = [round(t[1], 4) for t in times[name]]
    for name, res in results.items():
        print(
            f"  {name}: CPU s per call, uncertainty {res['unc_cpu_all']}, permutation {res['perm_cpu_all']}",
            flush=True,
        )
    report.note(
        f"post-hoc method times are medians of {args.repeats} calls per model, the two models alternating "
        "(order swapped every round); CPU s per call: "
        + "; ".join(
            f"{name} uncertainty {res['unc_cpu_all']}, permutation {res['perm_cpu_all']}"
            for name, res in results.items()
        )
    )

    new, old = results["cellvi"], results["original"]
    keys = list(new["quality"][args.seed])
    per_seed = {  # per_seed[name][metric] = array over the quality seeds
        name: {k: np.array([res["quality"][s][k] for s in quality_seeds], float) for k in keys}
        for name, res in results.items()
    }
    print(
        f"\nground truth (higher is better), means over seeds {quality_seeds}; paired difference cellvi - "
        "original and its standard error"
    )
    print(f"  {'':38s}  cellvi  original      diff     se")
    diffs = []
    for key in keys:
        a, b = per_seed["cellvi"][key], per_seed["original"][key]
        diff, se = paired_difference(a, b)
        diffs.append(f"{key} {diff:+.3f} (se {se:.3f})")
        print(f"  {key:38s} {a.mean():7.3f}   {b.mean():7.3f}   {diff:+7.3f}  {se:5.3f}")
        report.quality(key, float(a.mean()), float(b.mean()), better=_BETTER)
    if len(quality_seeds) > 1:
        columns = ["metric"] + [f"{name} seed {s}" for s in quality_seeds for name in ("original", "cellvi")]
        rows = [
            [key]
            + [
                float(per_seed[name][key][i])
                for i in range(len(quality_seeds))
                for name in ("original", "cellvi")
            ]
            for key in keys
        ]
        report.table(
            f"Quality per seed (the table above holds the means over seeds {quality_seeds})", columns, rows
        )
    report.note(
        f"quality figures are means over simulate_velocity seeds {quality_seeds} (new data and training seed "
        "each); paired differences cellvi - original (mean, standard error): " + "; ".join(diffs)
    )
    print("\nspeed (ratio: original / cellvi)          cellvi   original   ratio")
    per_epoch = f"training ({new['n_train']} cells x {new['epochs']} epochs)"
    rows = [
        ("training s/epoch (CPU)", "cpu", new["train_cpu"] / new["epochs"], old["train_cpu"] / old["epochs"]),
        (
            "training s/epoch (wall)",
            "wall",
            new["train_wall"] / new["epochs"],
            old["train_wall"] / old["epochs"],
        ),
        ("get_directional_uncertainty s (CPU)", "cpu", new["unc_cpu"], old["unc_cpu"]),
        ("get_directional_uncertainty s (wall)", "wall", new["unc_wall"], old["unc_wall"]),
        ("get_permutation_scores s (CPU)", "cpu", new["perm_cpu"], old["perm_cpu"]),
        ("get_permutation_scores s (wall)", "wall", new["perm_wall"], old["perm_wall"]),
    ]
    for label, clock, a, b in rows:
        print(f"  {label:38s} {a:7.3f}   {b:7.3f}   {b / a:5.1f}x")
    report.speed(per_epoch, new["train_cpu"], old["train_cpu"], clock="cpu")
    report.speed(per_epoch, new["train_wall"], old["train_wall"], clock="wall")
    unc = (
        f"get_directional_uncertainty ({args.uncertainty_samples} samples, n_jobs={args.uncertainty_n_jobs})"
    )
    report.speed(unc, new["unc_cpu"], old["unc_cpu"], clock="cpu")
    report.speed(unc, new["unc_wall"], old["unc_wall"], clock="wall")
    report.speed("get_permutation_scores (10 samples)", new["perm_cpu"], old["perm_cpu"], clock="cpu")
    report.speed("get_permutation_scores (10 samples)", new["perm_wall"], old["perm_wall"], clock="wall")
    print(
        f"\npeak memory growth of training (MiB)      {new['train_peak_mb']:7.1f}   {old['train_peak_mb']:7.1f}"
    )
    report.memory("training", new["train_peak_mb"], old["train_peak_mb"])
    if args.uncertainty_n_jobs != 1:
        note = "the original's uncertainty runs joblib worker processes; its CPU time misses the workers"
        print(f"  ({note})")
        report.note(note)
    report.write(args.json)


if __name__ == "__main__":
    main()
