"""Benchmark: cellvi.AMICI against the original ``amici-st`` 0.1.0, same data and hyperparameters, one run.

Usage::

    .venv/bin/python benchmarks/amici.py [--n-cells 3000] [--n-genes 100] [--epochs 10] [--skip-original]

The original is installed into its own environment under ``benchmarks/_envs/amici-st`` (git-ignored) the
first time: ``torch==2.13.0`` first (so pip takes the local CPU wheel), then ``amici-st==0.1.0`` with the
pins it needs to import today (``pyarrow<20``, ``transformers<5``, ``datasets<3``). Both models run in
their own subprocess with ``torch.set_num_threads(1)`` on the same simulated tissue
(:func:`cellvi.data.simulate_spatial`), the same neighbours (K nearest other-type cells), the same
train / held-out split (``external_indexing``), the same module hyperparameters (the paper's), batch size,
learning rate and number of epochs. Printed: seconds per training epoch (median over epochs after the
first), the throughput ratio, and the held-out reconstruction error (mean ``0.5 * SSE`` per cell, the
paper's model-selection metric) against the cell-type-mean baseline. The original is run with its own
optimiser default (Adam ``eps=0.01``) and, with ``--original-eps``, with cellvi's (``1e-8``) too.
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
def worker(impl: str, data: str, out: str, epochs: int, batch_size: int, n_neighbors: int, eps: float | None):
    import numpy as np
    import torch

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
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        external_indexing=split,
        plan_kwargs=plan_kwargs,
        callbacks=[timer],
        enable_progress_bar=False,
        accelerator="cpu",
    )
    train_s = time.perf_counter() - t0
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
    p.add_argument("--build-env", action="store_true", help="only build the original's environment")
    p.add_argument("--worker", choices=["cellvi", "original"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--eps", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(args.worker, args.data, args.out, args.epochs, args.batch_size, args.n_neighbors, args.eps)
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

    runs = [("cellvi", sys.executable, None)]
    if not args.skip_original:
        original_python = ensure_env()
        runs.append(("original", original_python, None))
        if args.original_eps:
            runs.append(("original", original_python, 1e-8))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tissue.h5ad"
        adata.write_h5ad(data)
        for impl, python, eps in runs:
            out = Path(tmp) / f"{impl}_{eps}.json"
            cmd = [str(python), __file__, "--worker", impl, "--data", str(data), "--out", str(out)]
            cmd += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
            cmd += ["--n-neighbors", str(args.n_neighbors)] + ([] if eps is None else ["--eps", str(eps)])
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
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
    print(
        f"{'implementation':<24}{'s/epoch':>10}{'CPU s/epoch':>13}{'params':>12}{'held-out rec.':>15}{'setup s':>9}"
    )
    ref = None
    for r in results:
        name = r["impl"] + (f" eps={r['eps']:g}" if r["eps"] is not None else "")
        times = r["epoch_s"][1:] or r["epoch_s"]
        per_epoch = float(np.median(times))
        cpu_epoch = float(np.median(r["epoch_cpu_s"][1:] or r["epoch_cpu_s"]))
        if r["impl"] == "cellvi":
            ref = (per_epoch, cpu_epoch)
        print(
            f"{name:<24}{per_epoch:>10.2f}{cpu_epoch:>13.2f}{r['n_params']:>12,}"
            f"{r['heldout_reconstruction']:>15.4f}{r['setup_s']:>9.2f}"
        )
        r["per_epoch"], r["cpu_epoch"] = per_epoch, cpu_epoch
    for r in results:
        if r["impl"] == "original":
            print(
                f"throughput ratio cellvi / original (eps={r['eps']:g}): {r['per_epoch'] / ref[0]:.1f}x wall-clock, "
                f"{r['cpu_epoch'] / ref[1]:.1f}x CPU time"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
