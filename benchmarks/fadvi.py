"""Benchmark cellvi.FADVI against the original ``fadvi`` package on the same simulated data, in one process.

``fadvi`` is not a dependency of cellvi: this script creates its own virtual environment under
``benchmarks/_envs/fadvi`` (git-ignored) with ``python -m venv``, ``pip install torch==2.13.0``,
``pip install -e .`` and ``pip install fadvi==0.3.0`` (scvi-tools kept at cellvi's 1.4.x), then re-runs
itself there. Both models train on the same AnnData with the same settings (epochs, batch size,
latent sizes, one torch thread) and are scored by the same fresh probes.

Printed figures:

- training throughput (cells x epochs / s of ``train()``) and the ratio cellvi / fadvi;
- label accuracy on the unlabeled cells (the model's ``predict``);
- integration of ``z_l`` (the documented integration output): label ASW (higher is better), batch
  mixing as the normalised entropy of batches among 30 nearest neighbours (1 = perfectly mixed) and
  kNN label accuracy;
- disentanglement: what fresh probes recover from each block on held-out cells
  (:func:`cellvi.fadvi.probe_latents`: balanced accuracy for batch / label, R^2 for the residual),
  with the floor of label-from-batch: the same probe on the batch one-hot (what the batch
  composition alone tells about the label);
- peak memory growth of ``train()`` (resident set, :func:`_common.measure`).

The adversarial training is stochastic: one run's leak figures move by up to ~0.15 between seeds, so
one seed cannot decide "at least as good". With ``--seeds 0 1 2 3 4`` every seed gets new simulated data
and both models train with that seed; the per-seed figures are printed, then the mean and sd of each
metric over the seeds, and "cellvi at least as good" is judged on the means (the default: seeds 0-9: with five,
the means of the near-floor leak rows moved by ~0.02 between two runs whose code differed only in float
rounding; ``--seed N`` runs one). Beside each mean difference the table prints its
paired standard error over the seeds (both models train on the same data per seed), so a reader can
tell a difference from seed noise; the judging rule does not use it. Training is timed by
wall and process CPU clock; with ``--repeats N`` the two models are trained N times per seed,
interleaved (fadvi, cellvi, fadvi, ...; quality from the first fit of each), and the reported times
are medians over all fits of all seeds. ``--json PATH`` writes the mean table as a
:class:`_common.Report`, with the sds and per-seed figures as an extra table.

Usage::

    flock /tmp/cellvi-bench.lock python benchmarks/fadvi.py --json benchmarks/results/fadvi.json
    flock /tmp/cellvi-bench.lock python benchmarks/fadvi.py --n-cells 2000 --n-genes 500 --epochs 20 --seed 1
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = ROOT / "benchmarks" / "_envs" / "fadvi"


def _ensure_env() -> Path:
    py = ENV / "bin" / "python"
    stamp = ENV / ".ready"
    if stamp.exists():
        return py
    ENV.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-e", str(ROOT)], check=True)
    subprocess.run([*pip, "fadvi==0.3.0", "scvi-tools>=1.4,<1.5", "captum>=0.7"], check=True)
    stamp.touch()
    return py


def _integration(Z, batch, label, seed=0) -> dict:
    import numpy as np
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(Z), size=min(3000, len(Z)), replace=False)
    asw_label = float((silhouette_score(Z[idx], label[idx]) + 1) / 2)
    nn = NearestNeighbors(n_neighbors=31).fit(Z)
    nbrs = nn.kneighbors(Z, return_distance=False)[:, 1:]
    codes_b = np.unique(batch, return_inverse=True)[1]
    B = codes_b.max() + 1
    counts = np.stack([(codes_b[nbrs] == b).mean(1) for b in range(B)], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(counts > 0, counts * np.log(counts), 0.0), 1) / np.log(B)
    codes_l = np.unique(label, return_inverse=True)[1]
    vote = np.array([np.bincount(codes_l[r]).argmax() for r in nbrs])
    return {
        "asw_label": asw_label,
        "batch_mixing": float(ent.mean()),
        "knn_label_acc": float((vote == codes_l).mean()),
    }


# the resolution of the quality figures: they are compared at the third decimal (one held-out cell
# of ~1,200 moves a balanced accuracy by ~0.001; a kept-signal row at 0.9998 against 1.0000 is a
# tie, not a loss)
_TOLERANCE = 5e-4
_LEAKS = ("z_l->batch", "z_r->batch", "z_b->label", "z_r->label", "z_b->residual", "z_l->residual")
_KEPT = ("z_b->batch", "z_l->label", "z_r->residual")
# quality rows: (key, label in the report, direction)
_QUALITY = (
    ("unlabeled_acc", "unlabeled label accuracy (predict)", "higher"),
    ("asw_label", "z_l label ASW (scaled 0-1)", "higher"),
    ("batch_mixing", "z_l batch mixing (kNN entropy)", "higher"),
    ("knn_label_acc", "z_l kNN label accuracy", "higher"),
    *((k, f"probe {k}", "higher") for k in _KEPT),
    *((k, f"probe {k} (leak)", "lower") for k in _LEAKS),
)


def _simulate(args, seed):
    """The benchmark's data for one seed, its ground truth and the composition floor of z_b->label."""
    import numpy as np

    from cellvi.data import simulate_batches
    from cellvi.fadvi import probe_latents

    adata = simulate_batches(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_batches=3,
        n_labels=6,
        unlabeled_fraction=0.3,
        seed=seed,
    )
    del adata.layers["log_mean_batch_free"]
    truth = {
        "batch": adata.obs["batch"].astype(str).to_numpy(),
        "label": adata.obs["cell_type"].astype(str).to_numpy(),
        "residual": adata.obs["residual"].to_numpy(dtype=float),
    }
    codes = np.unique(truth["batch"], return_inverse=True)[1]
    onehot = np.eye(codes.max() + 1)[codes] + 1e-3 * np.random.default_rng(seed).standard_normal(
        (len(codes), codes.max() + 1)
    )
    floor = float(probe_latents({"batch": onehot}, {"label": truth["label"]}, seed=seed)["score"].iloc[0])
    return adata, truth, floor


def _score(model, truth, unlabeled, seed) -> dict:
    """Every quality figure of one trained model (fresh probes, integration of z_l, predict)."""
    import numpy as np

    from cellvi.fadvi import probe_latents

    lat = {
        f"z_{k}": np.asarray(model.get_latent_representation(representation=k, give_mean=True), np.float64)
        for k in ("b", "l", "r")
    }
    pred = np.asarray(model.predict())
    probes = probe_latents(lat, truth, continuous=("residual",), seed=seed)
    return {
        "unlabeled_acc": float(np.mean(pred[unlabeled] == truth["label"][unlabeled])),
        **_integration(lat["z_l"], truth["batch"], truth["label"]),
        **{f"{r.latent}->{r.target}": r.score for r in probes.itertuples()},
    }


def _inner(args) -> None:
    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    import scvi
    from _common import Report, at_least_as_good, measure, paired_difference

    from cellvi.fadvi import FADVI as CellFADVI

    # this script is itself named fadvi.py: drop its folder from the path to import the package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.modules.pop("fadvi", None)
    import fadvi  # imported after cellvi: it changes the global warning filters

    classes = {"fadvi": fadvi.FADVI, "cellvi": CellFADVI}
    seeds = list(args.seeds) if args.seeds else ([args.seed] if args.seed is not None else list(range(10)))

    def fit(name, adata, seed):
        data = adata.copy()
        scvi.settings.seed = seed
        classes[name].setup_anndata(
            data, batch_key="batch", labels_key="labels", unlabeled_category="Unknown"
        )
        model = classes[name](data)
        m = measure(
            lambda: model.train(max_epochs=args.epochs, batch_size=args.batch_size, enable_progress_bar=False)
        )
        print(
            f"[seed {seed}, {name}] trained in {m.wall_s:.1f}s wall, {m.cpu_s:.1f}s cpu, +{m.peak_mb:.0f} MiB",
            flush=True,
        )
        return model, m

    # per_seed[seed][name] = {metric: value}; times[name] = every fit's Measurement (all seeds, repeats)
    per_seed, floors, times = {}, {}, {name: [] for name in classes}
    for seed in seeds:
        adata, truth, floors[seed] = _simulate(args, seed)
        unlabeled = ~adata.obs["is_labeled"].to_numpy()
        per_seed[seed] = {}
        for rep in range(args.repeats):
            for name in classes:
                model, m = fit(name, adata, seed)
                times[name].append(m)
                if rep == 0:
                    per_seed[seed][name] = _score(model, truth, unlabeled, seed)
        frame = pd.DataFrame(per_seed[seed])
        print(
            f"\nseed {seed} (z_b->label floor {floors[seed]:.3f}):\n{frame.round(3).to_string()}\n",
            flush=True,
        )

    keys = [k for k, _, _ in _QUALITY]
    values = {  # values[name][metric] = array over seeds
        name: {k: np.array([per_seed[s][name][k] for s in seeds], float) for k in keys} for name in classes
    }
    mean = {name: {k: float(v.mean()) for k, v in values[name].items()} for name in classes}
    sd = {
        name: {k: float(v.std(ddof=1)) if len(seeds) > 1 else float("nan") for k, v in values[name].items()}
        for name in classes
    }
    timing = {
        name: {
            "train_wall_s": float(np.median([m.wall_s for m in times[name]])),
            "train_cpu_s": float(np.median([m.cpu_s for m in times[name]])),
            "peak_mb": float(max(m.peak_mb for m in times[name])),
        }
        for name in classes
    }
    c, f = mean["cellvi"], mean["fadvi"]

    def as_good(key, better):
        row = {"cellvi": c[key], "original": f[key], "better": better, "tolerance": _TOLERANCE}
        return bool(at_least_as_good(row))

    # paired over seeds (both models see the same data per seed): mean difference and its standard error
    paired = {k: paired_difference(values["cellvi"][k], values["fadvi"][k]) for k in keys}  # (mean, se)
    table = pd.DataFrame(
        {
            "fadvi mean": [f[k] for k in keys],
            "fadvi sd": [sd["fadvi"][k] for k in keys],
            "cellvi mean": [c[k] for k in keys],
            "cellvi sd": [sd["cellvi"][k] for k in keys],
            "cellvi - fadvi": [paired[k][0] for k in keys],
            "paired se": [paired[k][1] for k in keys],
            "better": [b for _, _, b in _QUALITY],
            "cellvi at least as good": ["yes" if as_good(k, b) else "NO" for k, _, b in _QUALITY],
        },
        index=keys,
    )
    floor_mean = float(np.mean(list(floors.values())))
    n_fits = len(seeds) * args.repeats
    print(
        f"\nFADVI benchmark: {args.n_cells} cells x {args.n_genes} genes, 3 batches, 6 types (30% unlabeled), "
        f"{args.epochs} epochs, batch size {args.batch_size}, 1 torch thread, same data and settings; "
        f"seeds {seeds} (new data and training seed each), {args.repeats} interleaved fit(s) per seed"
    )
    print(f"quality: mean and sd over the {len(seeds)} seed(s), judged on the means")
    print(table.round(3).to_string())
    print(f"\ntraining, median of {n_fits} fit(s) each:")
    print(pd.DataFrame(timing).round(1).to_string())
    tc, tf = timing["cellvi"], timing["fadvi"]
    print(
        f"training throughput ratio cellvi / fadvi: {tf['train_wall_s'] / tc['train_wall_s']:.2f}x wall, "
        f"{tf['train_cpu_s'] / tc['train_cpu_s']:.2f}x cpu"
    )
    print(
        "probes: balanced accuracy (chance batch 0.333, label 0.167) and R^2 for the residual; leakage rows are "
        f"{', '.join(_LEAKS)} (lower is better); label from the batch one-hot alone (composition floor of "
        f"z_b->label): {floor_mean:.3f} (per seed: {', '.join(f'{floors[s]:.3f}' for s in seeds)})."
    )
    report = Report(
        "fadvi",
        settings={
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seeds": seeds,
            "repeats": args.repeats,
            "original": f"fadvi {importlib.metadata.version('fadvi')}",
        },
    )
    report.speed("training (wall)", cellvi_s=tc["train_wall_s"], original_s=tf["train_wall_s"], clock="wall")
    report.speed("training (cpu)", cellvi_s=tc["train_cpu_s"], original_s=tf["train_cpu_s"], clock="cpu")
    report.memory("training", cellvi_mb=tc["peak_mb"], original_mb=tf["peak_mb"])
    for key, label, better in _QUALITY:
        report.quality(label, c[key], f[key], better, tolerance=_TOLERANCE)
    if len(seeds) > 1:
        columns = ["metric", "original sd", "cellvi sd"]
        for s in seeds:
            columns += [f"original seed {s}", f"cellvi seed {s}"]
        rows = []
        for key, label, _ in _QUALITY:
            row = [label, sd["fadvi"][key], sd["cellvi"][key]]
            for s in seeds:
                row += [per_seed[s]["fadvi"][key], per_seed[s]["cellvi"][key]]
            rows.append(row)
        report.table(f"Quality per seed (the table above holds the means over seeds {seeds})", columns, rows)
    report.note(
        f"quality figures are means over seeds {seeds} (new simulated data and training seed each); training "
        f"times are medians over {n_fits} interleaved fits per model"
    )
    report.note(
        f"quality means are compared at the third decimal (tolerance {_TOLERANCE:g}, the resolution of a "
        "balanced accuracy on ~1,200 held-out cells); a 'tie' is within it"
    )
    report.note(
        "paired differences cellvi - fadvi over the seeds (mean, standard error): "
        + "; ".join(f"{label} {paired[k][0]:+.3f} (se {paired[k][1]:.3f})" for k, label, _ in _QUALITY)
    )
    report.note(
        f"z_b->label floor from batch composition alone (probe on the batch one-hot): {floor_mean:.3f} "
        f"(per seed: {', '.join(f'{floors[s]:.3f}' for s in seeds)})"
    )
    report.write(args.json)


def main(argv=None) -> int:
    from _common import add_json_argument, allocator_env

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=4000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds (new data and training seed each); quality is the mean over them (default: 0 to 9)",
    )
    p.add_argument("--seed", type=int, default=None, help="one seed only (the same as --seeds SEED)")
    p.add_argument(
        "--repeats", type=int, default=1, help="interleaved fits per model and seed for the timings"
    )
    add_json_argument(p)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        _inner(args)
        return 0
    py = _ensure_env()
    cmd = [str(py), __file__, "--inner", *(argv if argv is not None else sys.argv[1:])]
    return subprocess.run(
        cmd,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **allocator_env()},
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
