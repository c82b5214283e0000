"""Benchmark: cellvi.AMICI against the original ``amici-st`` 0.1.0, same data and hyperparameters, one run.

Usage::

    .venv/bin/python benchmarks/amici.py [--n-cells 3000] [--n-genes 100] [--epochs 10] [--skip-original]
        [--original-eps] [--patch-size 1] [--json PATH]

The original is installed into its own environment under ``benchmarks/_envs/amici-st`` (git-ignored) the
first time: ``torch==2.13.0`` first (so pip takes the local CPU wheel), then ``amici-st==0.1.0`` with the
pins it needs to import today (``pyarrow<20``, ``transformers<5``, ``datasets<3``). Both models run in
their own subprocess with ``torch.set_num_threads(1)`` on the same simulated tissue
(:func:`cellvi.data.simulate_spatial`), the same neighbours (K nearest other-type cells), the same
train / held-out split (``external_indexing``), the same module hyperparameters (the paper's), batch size,
learning rate and number of epochs. Printed: seconds per training epoch (median over epochs after the
first), the throughput ratio, and the held-out reconstruction error (mean ``0.5 * SSE`` per cell, the
paper's model-selection metric) against the cell-type-mean baseline. The original is run with its own
optimiser default (Adam ``eps=0.01``) and, with ``--original-eps``, with cellvi's (``1e-8``) too. Peak memory is
the resident-set growth of each worker during ``train`` (:func:`_common.measure`). ``--json PATH`` writes the
figures as a :class:`_common.Report` (ratios original / cellvi: per-epoch wall and CPU time against the original
with its default ``eps``; held-out errors of every run and the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Report, add_json_argument, allocator_env

HERE = Path(__file__).resolve().parent
ENV = HERE / "_envs" / "amici-st"
ORIGINAL_PINS = ["amici-st==0.1.0", "pyarrow<20", "transformers<5", "datasets<3"]

# the paper's settings, passed explicitly to both implementations
MODEL_KWARGS = dict(
    n_label_embed=32, n_kv_dim=256, n_query_embed_hidden=512, n_query_dim=128, n_nn_embed=256,
    n_nn_embed_hidden=512, n_pos_coef_mlp_hidden=512, n_head_size=32, n_heads=8, neighbor_dropout=0.1,
    attention_dummy_score=3.0,
)  # fmt: skip


def ensure_env() -> Path:
    """The original's environment (built on first use); returns its python."""
    python = ENV / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import amici"], capture_output=True).returncode == 0
    ):
        return python
    print(f"building {ENV} for amici-st 0.1.0 (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(ENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *ORIGINAL_PINS], check=True)
    check = subprocess.run([python, "-c", "import amici"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"amici-st does not import in {ENV}:\n{check.stderr[-2000:]}")
    return python


# ---------------------------------------------------------------------------- worker (runs in either env)
def worker(
    impl: str,
    data: str,
    out: str,
    epochs: int,
    batch_size: int,
    n_neighbors: int,
    eps: float | None,
    patch_size: int = 1,
):
    import numpy as np
    import torch
    from _common import measure  # (stdlib only: importable in the original's environment too)

    torch.set_num_threads(1)
    import anndata as ad
    import scvi
    from lightning.pytorch.callbacks import Callback

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    if impl == "original":
        # this script is itself named amici.py: take its folder off the path before importing the package
        sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != HERE]
        sys.modules.pop("amici", None)
        from amici import AMICI
    else:
        from cellvi.amici import AMICI

    adata = ad.read_h5ad(data)
    split = [adata.uns["bench_train_idx"], adata.uns["bench_val_idx"], np.array([], dtype=np.int64)]
    t0 = time.perf_counter()
    AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=n_neighbors)
    setup_s = time.perf_counter() - t0
    model = AMICI(adata, **MODEL_KWARGS)

    class EpochTimer(Callback):
        def __init__(self):
            self.times, self.cpu_times = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t)
            self.cpu_times.append(time.process_time() - self._c)

    timer = EpochTimer()
    plan_kwargs = {"lr": 1e-3} if eps is None else {"lr": 1e-3, "eps": eps}
    extra = (
        {"datasplitter_kwargs": {"patch_size": patch_size}} if impl == "cellvi" and patch_size != 1 else {}
    )
    m = measure(
        lambda: model.train(
            max_epochs=epochs,
            batch_size=batch_size,
            external_indexing=split,
            plan_kwargs=plan_kwargs,
            callbacks=[timer],
            enable_progress_bar=False,
            accelerator="cpu",
            **extra,
        )
    )
    train_s = m.wall_s
    t0 = time.perf_counter()
    rec = model.get_reconstruction_error(indices=split[1], batch_size=512)["reconstruction_loss"]
    eval_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.module.parameters())
    result = {
        "impl": impl,
        "eps": model.trainer.lightning_module.eps if hasattr(model, "trainer") else eps,
        "epoch_s": timer.times,
        "epoch_cpu_s": timer.cpu_times,
        "train_s": train_s,
        "train_cpu_s": m.cpu_s,
        "peak_mb": m.peak_mb,
        "setup_s": setup_s,
        "eval_s": eval_s,
        "heldout_reconstruction": float(rec),
        "n_params": int(n_params),
    }
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-genes", type=int, default=100)
    p.add_argument("--n-neighbors", type=int, default=30)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--skip-original", action="store_true", help="time cellvi only")
    p.add_argument("--original-eps", action="store_true", help="also run the original with eps=1e-8")
    p.add_argument(
        "--patch-size", type=int, default=1, help="cellvi's spatial patch size (1: random minibatches)"
    )
    p.add_argument("--build-env", action="store_true", help="only build the original's environment")
    add_json_argument(p)
    p.add_argument("--worker", choices=["cellvi", "original"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--eps", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(
            args.worker,
            args.data,
            args.out,
            args.epochs,
            args.batch_size,
            args.n_neighbors,
            args.eps,
            args.patch_size,
        )
        return 0
    if args.build_env:
        ensure_env()
        return 0

    import numpy as np

    from cellvi.data import simulate_spatial

    adata = simulate_spatial(n_cells=args.n_cells, n_genes=args.n_genes, seed=0)
    rng = np.random.default_rng(0)
    perm = rng.permutation(adata.n_obs)
    n_val = adata.n_obs // 10
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    adata.uns["bench_train_idx"], adata.uns["bench_val_idx"] = train, val
    # baseline: the training cells' type means
    X, codes = np.asarray(adata.X), adata.obs["cell_type"].cat.codes.to_numpy()
    means = np.stack([X[train][codes[train] == c].mean(0) for c in range(codes.max() + 1)])
    baseline = float(0.5 * ((X[val] - means[codes[val]]) ** 2).sum(1).mean())

    # cellvi runs before and after each original run: each ratio is taken against the mean of the cellvi
    # runs beside it, so that a change in the machine's load during the run biases neither side
    runs = [("cellvi", sys.executable, None)]
    if not args.skip_original:
        original_python = ensure_env()
        for eps in [None, 1e-8] if args.original_eps else [None]:
            runs += [("original", original_python, eps), ("cellvi", sys.executable, None)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tissue.h5ad"
        adata.write_h5ad(data)
        for i, (impl, python, eps) in enumerate(runs):
            out = Path(tmp) / f"{i}_{impl}_{eps}.json"
            cmd = [str(python), __file__, "--worker", impl, "--data", str(data), "--out", str(out)]
            cmd += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
            cmd += ["--n-neighbors", str(args.n_neighbors), "--patch-size", str(args.patch_size)]
            cmd += [] if eps is None else ["--eps", str(eps)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **allocator_env()}
            if impl == "cellvi":
                env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
            print(f"running {impl}{'' if eps is None else f' (eps={eps:g})'} ...", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"{impl} run failed")
            results.append(json.loads(out.read_text()))

    print(
        f"\nAMICI benchmark: {args.n_cells} cells x {args.n_genes} genes, K={args.n_neighbors}, "
        f"batch {args.batch_size}, {args.epochs} epochs, 1 CPU thread, "
        f"{len(train)} training / {len(val)} held-out cells"
    )
    print(f"held-out reconstruction of the cell-type-mean baseline: {baseline:.4f}")
    head = f"{'implementation':<24}{'s/epoch':>9}{'CPU s/epoch':>12}{'peak MB':>9}{'params':>12}{'held-out rec.':>14}"
    print(head + f"{'setup s':>9}")
    for r in results:
        r["name"] = r["impl"] + (f" eps={r['eps']:g}" if r["eps"] is not None else "")
        r["per_epoch"] = float(np.median(r["epoch_s"][1:] or r["epoch_s"]))
        r["cpu_epoch"] = float(np.median(r["epoch_cpu_s"][1:] or r["epoch_cpu_s"]))
    for i, r in enumerate(results):
        print(
            f"{r['name']:<24}{r['per_epoch']:>9.2f}{r['cpu_epoch']:>12.2f}{r['peak_mb']:>9.0f}{r['n_params']:>12,}"
            f"{r['heldout_reconstruction']:>14.4f}{r['setup_s']:>9.2f}"
        )
        if r["impl"] == "original":  # cellvi's runs just before and after
            beside = [results[i - 1], results[i + 1]]
            r["ours_epoch"] = float(np.mean([o["per_epoch"] for o in beside]))
            r["ours_cpu_epoch"] = float(np.mean([o["cpu_epoch"] for o in beside]))
    ours = results[0]
    originals = [r for r in results if r["impl"] == "original"]
    for r in originals:
        print(
            f"throughput ratio cellvi / original (eps={r['eps']:g}): {r['per_epoch'] / r['ours_epoch']:.1f}x "
            f"wall-clock, {r['cpu_epoch'] / r['ours_cpu_epoch']:.1f}x CPU time "
            f"(cellvi runs beside it: {r['ours_epoch']:.2f} s/epoch)"
        )

    report = Report(
        "amici",
        settings={
            "n_cells": args.n_cells, "n_genes": args.n_genes, "n_neighbors": args.n_neighbors,
            "epochs": args.epochs, "batch_size": args.batch_size, "patch_size": args.patch_size, "threads": 1,
        },
    )  # fmt: skip
    orig = next((r for r in originals if r["eps"] is not None and r["eps"] > 1e-4), None)
    orig = orig or (originals[0] if originals else None)
    for clock, key, mine in (("wall", "per_epoch", "ours_epoch"), ("cpu", "cpu_epoch", "ours_cpu_epoch")):
        report.speed(
            "training epoch",
            cellvi_s=orig[mine] if orig else ours[key],
            original_s=orig[key] if orig else None,
            clock=clock,
        )
    report.memory("training", cellvi_mb=ours["peak_mb"], original_mb=orig["peak_mb"] if orig else None)
    report.quality(
        "held-out reconstruction (0.5 SSE per cell)",
        cellvi=ours["heldout_reconstruction"],
        original=orig["heldout_reconstruction"] if orig else None,
        better="lower",
    )
    report.note(f"cell-type-mean baseline held-out reconstruction: {baseline:.4f}")
    for r in originals:
        if r is not orig:
            report.note(
                f"{r['name']}: held-out {r['heldout_reconstruction']:.4f}, {r['per_epoch']:.2f} s/epoch"
            )
    if orig is None:
        report.note("original not run (--skip-original)")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
