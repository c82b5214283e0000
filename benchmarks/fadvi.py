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

Training is timed by wall and process CPU clock; with ``--repeats N`` the two models are trained
N times, interleaved (fadvi, cellvi, fadvi, ...), and the median times are reported (quality
figures come from the first fit of each). ``--json PATH`` writes the figures as a
:class:`_common.Report`.

Usage::

    flock /tmp/cellvi-bench.lock python benchmarks/fadvi.py --n-cells 2000 --n-genes 500 --epochs 20 --json out.json
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


_LEAKS = ("z_l->batch", "z_r->batch", "z_b->label", "z_r->label", "z_b->residual", "z_l->residual")
_KEPT = ("z_b->batch", "z_l->label", "z_r->residual")


def _inner(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import scvi
    from _common import Report, measure

    from cellvi.data import simulate_batches
    from cellvi.fadvi import FADVI as CellFADVI
    from cellvi.fadvi import probe_latents

    # this script is itself named fadvi.py: drop its folder from the path to import the package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.modules.pop("fadvi", None)
    import fadvi  # noqa: E402  (imported after cellvi; it changes the global warning filters)

    adata = simulate_batches(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_batches=3,
        n_labels=6,
        unlabeled_fraction=0.3,
        seed=args.seed,
    )
    del adata.layers["log_mean_batch_free"]
    truth = {
        "batch": adata.obs["batch"].astype(str).to_numpy(),
        "label": adata.obs["cell_type"].astype(str).to_numpy(),
        "residual": adata.obs["residual"].to_numpy(dtype=float),
    }
    codes = np.unique(truth["batch"], return_inverse=True)[1]
    onehot = np.eye(codes.max() + 1)[codes] + 1e-3 * np.random.default_rng(args.seed).standard_normal(
        (len(codes), codes.max() + 1)
    )
    floor = float(
        probe_latents({"batch": onehot}, {"label": truth["label"]}, seed=args.seed)["score"].iloc[0]
    )
    unl = ~adata.obs["is_labeled"].to_numpy()
    classes = {"fadvi": fadvi.FADVI, "cellvi": CellFADVI}

    def fit(name):
        data = adata.copy()
        scvi.settings.seed = args.seed
        classes[name].setup_anndata(
            data, batch_key="batch", labels_key="labels", unlabeled_category="Unknown"
        )
        model = classes[name](data)
        m = measure(
            lambda: model.train(max_epochs=args.epochs, batch_size=args.batch_size, enable_progress_bar=False)
        )
        print(
            f"[{name}] trained in {m.wall_s:.1f}s wall, {m.cpu_s:.1f}s cpu, +{m.peak_mb:.0f} MiB", flush=True
        )
        return model, m

    rows, times = {}, {name: [] for name in classes}
    for rep in range(args.repeats):
        for name in classes:
            model, m = fit(name)
            times[name].append(m)
            if rep:
                continue
            lat = {
                f"z_{k}": np.asarray(
                    model.get_latent_representation(representation=k, give_mean=True), np.float64
                )
                for k in ("b", "l", "r")
            }
            pred = np.asarray(model.predict())
            probes = probe_latents(lat, truth, continuous=("residual",), seed=args.seed)
            rows[name] = {
                "unlabeled_acc": float(np.mean(pred[unl] == truth["label"][unl])),
                **_integration(lat["z_l"], truth["batch"], truth["label"]),
                **{f"{r.latent}->{r.target}": r.score for r in probes.itertuples()},
            }
    for name in classes:
        wall = float(np.median([m.wall_s for m in times[name]]))
        cpu = float(np.median([m.cpu_s for m in times[name]]))
        rows[name] = {
            "train_wall_s": wall,
            "train_cpu_s": cpu,
            "throughput_wall": args.n_cells * args.epochs / wall,
            "throughput_cpu": args.n_cells * args.epochs / cpu,
            "peak_mb": float(max(m.peak_mb for m in times[name])),
            **rows[name],
        }

    import pandas as pd

    table = pd.DataFrame(rows)
    print(
        f"\nFADVI benchmark: {args.n_cells} cells x {args.n_genes} genes, 3 batches, 6 types (30% unlabeled), "
        f"{args.epochs} epochs, batch size {args.batch_size}, 1 torch thread, same data and settings, "
        f"{args.repeats} interleaved fit(s) each"
    )
    print(table.round(3).to_string())
    c, f = rows["cellvi"], rows["fadvi"]
    print(
        f"\ntraining throughput ratio cellvi / fadvi: {f['train_wall_s'] / c['train_wall_s']:.2f}x wall, "
        f"{f['train_cpu_s'] / c['train_cpu_s']:.2f}x cpu"
    )
    print(
        "probes: balanced accuracy (chance batch 0.333, label 0.167) and R^2 for the residual; leakage rows are "
        f"{', '.join(_LEAKS)} (lower is better); label from the batch one-hot alone (composition floor of "
        f"z_b->label): {floor:.3f}."
    )
    report = Report(
        "fadvi",
        settings={
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "repeats": args.repeats,
            "original": f"fadvi {importlib.metadata.version('fadvi')}",
        },
    )
    report.speed("training (wall)", cellvi_s=c["train_wall_s"], original_s=f["train_wall_s"], clock="wall")
    report.speed("training (cpu)", cellvi_s=c["train_cpu_s"], original_s=f["train_cpu_s"], clock="cpu")
    report.memory("training", cellvi_mb=c["peak_mb"], original_mb=f["peak_mb"])
    report.quality("unlabeled label accuracy (predict)", c["unlabeled_acc"], f["unlabeled_acc"], "higher")
    report.quality("z_l label ASW (scaled 0-1)", c["asw_label"], f["asw_label"], "higher")
    report.quality("z_l batch mixing (kNN entropy)", c["batch_mixing"], f["batch_mixing"], "higher")
    report.quality("z_l kNN label accuracy", c["knn_label_acc"], f["knn_label_acc"], "higher")
    for key in _KEPT:
        report.quality(f"probe {key}", c[key], f[key], "higher")
    for key in _LEAKS:
        report.quality(f"probe {key} (leak)", c[key], f[key], "lower")
    report.note(f"z_b->label floor from batch composition alone (probe on the batch one-hot): {floor:.3f}")
    report.write(args.json)


def main(argv=None) -> int:
    from _common import add_json_argument

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=4000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="interleaved fits per model for the timings")
    add_json_argument(p)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        _inner(args)
        return 0
    py = _ensure_env()
    cmd = [str(py), __file__, "--inner", *(argv if argv is not None else sys.argv[1:])]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main())
