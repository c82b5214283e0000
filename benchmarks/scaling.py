"""How time per training epoch grows with the number of cells: cellvi's models and the originals, side by side.

For each model, data are simulated once at the largest size with :mod:`cellvi.data` (realistic gene
counts, as in the model's own benchmark) and the first ``n`` cells are taken for each size:

=========  ===============================  =======  ====================================================
model      simulator                        genes    originals timed beside cellvi
=========  ===============================  =======  ====================================================
scar       ``simulate_ambient``              2000     ``scvi.external.SCAR`` (this environment)
velovi     ``simulate_velocity``               50     ``scvi.external.VELOVI`` (this environment)
fadvi      ``simulate_batches``              2000     ``fadvi`` 0.3.0 if ``benchmarks/_envs/fadvi`` exists
amici      ``simulate_spatial``               100     ``amici-st`` 0.1.0 if ``benchmarks/_envs/amici-st``
                                                      exists (built by ``benchmarks/fadvi.py`` / ``amici.py``)
=========  ===============================  =======  ====================================================

Every (model, implementation, size) trains one epoch in its own subprocess with one torch thread and
the model's default settings (minibatch 128, 256 for VELOVI; AMICI with the paper's hyperparameters of
``benchmarks/amici.py``, K = 30 neighbours). The epoch is timed from its start to the end of its last
training minibatch (validation is not timed) by wall and process CPU clock. When an epoch has more than
``--max-batches`` minibatches, only that many are run and the time is scaled to the full epoch
(``s/epoch = time x batches_per_epoch / batches_run``); the ``timed`` column says which (``full`` or
``k/K batches``). ``ms/batch`` (CPU) is the figure that must stay flat if an epoch grows linearly in
cells. ``setup s`` is the rest of the subprocess's work from reading the data to the end of ``train()``
(``setup_anndata``, the model, the data path's set-up; validation on limited epochs is capped at 2
minibatches). ``peak MiB`` is the resident-set growth during setup and training (:func:`_common.measure`).

Usage::

    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/scaling.py            # 10k, 30k, 100k cells
    .venv/bin/python benchmarks/scaling.py --sizes 10000 30000 --models scar fadvi --json out.json
    .venv/bin/python benchmarks/scaling.py --max-batches 0   # full epochs everywhere (slow: AMICI)

``--json PATH`` writes a :class:`_common.Report` (scaling table, cellvi / original ratios of the CPU
time per epoch at each size, peak memory).
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
ROOT = HERE.parent
ENVS = HERE / "_envs"

MODELS = ("scar", "velovi", "fadvi", "amici")
GENES = {"scar": 2000, "velovi": 50, "fadvi": 2000, "amici": 100}
BATCH_SIZE = {"scar": 128, "velovi": 256, "fadvi": 128, "amici": 128}
ORIGINAL_NAME = {
    "scar": "scvi.external.SCAR",
    "velovi": "scvi.external.VELOVI",
    "fadvi": "fadvi 0.3.0",
    "amici": "amici-st 0.1.0",
}
AMICI_NEIGHBORS = 30


def _load_common():
    import importlib.util

    if "_common" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_common", HERE / "_common.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_common"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["_common"]


def _amici_model_kwargs() -> dict:
    """The paper's AMICI hyperparameters, as ``benchmarks/amici.py`` passes them to both implementations."""
    import ast

    tree = ast.parse((HERE / "amici.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "MODEL_KWARGS" for t in node.targets
        ):
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}
    raise RuntimeError("MODEL_KWARGS not found in benchmarks/amici.py")


def original_python(model: str) -> str | None:
    """The interpreter that runs the original of ``model``, or None where its environment does not exist."""
    if model in ("scar", "velovi"):
        return sys.executable
    env = ENVS / ("fadvi" if model == "fadvi" else "amici-st")
    python = env / "bin" / "python"
    if not python.exists():
        return None
    probe = "import fadvi" if model == "fadvi" else "import amici"
    # the script folder holds fadvi.py / amici.py: probe from the environment's own folder
    ok = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, cwd=env).returncode == 0
    return str(python) if ok else None


# ---------------------------------------------------------------------------------------- data (driver)
def simulate(model: str, n_cells: int, seed: int = 0):
    """Simulated AnnData for ``model`` with ``n_cells`` cells, ready for both implementations."""
    import numpy as np

    import cellvi

    if model == "scar":
        adata, _ = cellvi.data.simulate_ambient(
            n_cells=n_cells, n_genes=GENES["scar"], n_empty=1000, n_damaged=0, seed=seed
        )
        adata.varm["ambient_profile_true"] = np.asarray(adata.varm["ambient_profile_true"])
        for layer in list(adata.layers):
            del adata.layers[layer]
    elif model == "velovi":
        from cellvi.velovi import preprocess_data

        raw = cellvi.data.simulate_velocity(n_obs=n_cells, n_vars=GENES["velovi"], seed=seed)
        # min-max scaled raw layers as "Ms" / "Mu": kNN moments change the values, not the cost of an epoch
        raw.layers["Ms"], raw.layers["Mu"] = raw.layers["spliced"], raw.layers["unspliced"]
        adata = preprocess_data(raw, filter_on_r2=False)
        for layer in list(adata.layers):
            if layer not in ("Ms", "Mu"):
                del adata.layers[layer]
    elif model == "fadvi":
        adata = cellvi.data.simulate_batches(n_cells=n_cells, n_genes=GENES["fadvi"], seed=seed)
        for layer in list(adata.layers):
            del adata.layers[layer]
    elif model == "amici":
        adata = cellvi.data.simulate_spatial(n_cells=n_cells, n_genes=GENES["amici"], seed=seed)
        adata.uns = {}
    else:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return adata


# ------------------------------------------------------------------------------- worker (either env)
def worker(model: str, impl: str, data: str, out: str, max_batches: int) -> None:
    """Set up ``model`` (``impl``: 'cellvi' or 'original') on ``data`` and time one training epoch."""
    import logging
    import math
    import warnings

    common = _load_common()
    warnings.filterwarnings("ignore")  # a benchmark worker: keep the output readable
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import anndata as ad
    import scvi
    from lightning.pytorch.callbacks import Callback

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    if impl == "original" and model in ("fadvi", "amici"):
        # this folder holds fadvi.py and amici.py: take it off the path before importing the packages
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        sys.modules.pop(model, None)

    adata = ad.read_h5ad(data)
    n_train = math.ceil(0.9 * adata.n_obs)  # scvi's default split (validation_size 0.1)
    batch_size = BATCH_SIZE[model]
    n_batches = -(-n_train // batch_size)
    limited = 0 < max_batches < n_batches
    run_batches = max_batches if limited else n_batches

    class EpochTimer(Callback):
        """Times of the first epoch: from its start to the end of each training minibatch."""

        def __init__(self):
            self.start = self.cpu_start = None
            self.last = self.cpu_last = None
            self.seen = 0

        def on_train_epoch_start(self, trainer, pl_module):
            if self.start is None:
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0:
                self.last, self.cpu_last = time.perf_counter(), time.process_time()
                self.seen += 1

    timer = EpochTimer()
    trainer_kwargs = {"callbacks": [timer], "enable_progress_bar": False, "enable_model_summary": False}
    trainer_kwargs["accelerator"] = "cpu"
    if limited:
        trainer_kwargs.update(limit_train_batches=run_batches, limit_val_batches=2)

    def setup_and_train():
        if model == "scar":
            cls = scvi.external.SCAR if impl == "original" else __import__("cellvi").SCAR
            cls.setup_anndata(adata)
            profile = adata.varm["ambient_profile_true"]
            net = cls(adata, ambient_profile=np.asarray(profile)[:, 0] if impl == "original" else profile)
            net.train(max_epochs=1, batch_size=batch_size, **trainer_kwargs)
        elif model == "velovi":
            cls = scvi.external.VELOVI if impl == "original" else __import__("cellvi").VELOVI
            cls.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
            net = cls(adata)
            net.train(max_epochs=1, batch_size=batch_size, early_stopping=False, **trainer_kwargs)
        elif model == "fadvi":
            if impl == "original":
                from fadvi import FADVI as cls
            else:
                from cellvi import FADVI as cls
            cls.setup_anndata(adata, batch_key="batch", labels_key="labels", unlabeled_category="Unknown")
            net = cls(adata)
            net.train(max_epochs=1, batch_size=batch_size, **trainer_kwargs)
        else:
            if impl == "original":
                from amici import AMICI as cls
            else:
                from cellvi import AMICI as cls
            cls.setup_anndata(
                adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=AMICI_NEIGHBORS
            )
            net = cls(adata, **json.loads(os.environ["CELLVI_SCALING_AMICI_KWARGS"]))
            net.train(max_epochs=1, batch_size=batch_size, plan_kwargs={"lr": 1e-3}, **trainer_kwargs)
        return net

    t_all = time.perf_counter()
    m = common.measure(setup_and_train)
    total_wall = time.perf_counter() - t_all
    if timer.seen != run_batches:
        raise RuntimeError(f"expected {run_batches} training minibatches in the epoch, saw {timer.seen}")
    wall, cpu = timer.last - timer.start, timer.cpu_last - timer.cpu_start
    scale = n_batches / run_batches
    import resource

    result = {
        "model": model,
        "impl": impl,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "batch_size": batch_size,
        "batches_per_epoch": n_batches,
        "batches_run": run_batches,
        "epoch_wall_s": wall * scale,
        "epoch_cpu_s": cpu * scale,
        "ms_per_batch_cpu": 1e3 * cpu / run_batches,
        "setup_wall_s": total_wall - wall,
        "peak_mb": m.peak_mb,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver
def _run_worker(python: str, model: str, impl: str, data: Path, tmp: Path, max_batches: int, env) -> dict:
    out = tmp / f"{model}_{impl}_{data.stem}.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", model, impl, "--data", str(data)]
    cmd += ["--out", str(out), "--max-batches", str(max_batches)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        print(f"    {impl} FAILED (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {
            "model": model,
            "impl": impl,
            "failed": tail.strip().splitlines()[-1] if tail.strip() else "?",
        }
    return json.loads(out.read_text())


def _fmt_timed(r: dict) -> str:
    return (
        "full"
        if r["batches_run"] == r["batches_per_epoch"]
        else f"{r['batches_run']}/{r['batches_per_epoch']} batches"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="numbers of cells")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--max-batches",
        type=int,
        default=150,
        help="run at most this many minibatches of an epoch and scale the time to the epoch (0: full epochs)",
    )
    p.add_argument("--no-originals", action="store_true", help="time cellvi only")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, data=args.data, out=args.out, max_batches=args.max_batches)
        return 0
    if any(n < 100 for n in args.sizes):
        p.error(f"--sizes must be numbers of cells >= 100, got {args.sizes}")
    sizes = sorted(set(args.sizes))

    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    common = _load_common()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.update(common.allocator_env())  # cellvi's heap thresholds (cellvi._malloc), for the originals too
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["CELLVI_SCALING_AMICI_KWARGS"] = json.dumps(_amici_model_kwargs())
    print(
        f"scaling: sizes {sizes}, models {args.models}, 1 torch thread per process, "
        f"at most {args.max_batches or 'all'} minibatches timed per epoch (scaled to the epoch)",
        flush=True,
    )
    results: list[dict] = []
    skipped: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for model in args.models:
            impls = [("cellvi", sys.executable)]
            if not args.no_originals:
                python = original_python(model)
                if python is None:
                    skipped.append(f"{model}: original not timed ({ORIGINAL_NAME[model]}: no environment)")
                else:
                    impls.append(("original", python))
            t0 = time.perf_counter()
            full = simulate(model, sizes[-1])
            print(
                f"\n{model}: simulated {full.n_obs} x {full.n_vars} in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            for i, n in enumerate(sizes):
                data = tmp / f"{model}_{n}.h5ad"
                full[:n].copy().write_h5ad(data)
                # alternate which implementation runs first, so that a load change hits both alike
                for impl, python in impls if i % 2 == 0 else impls[::-1]:
                    r = _run_worker(python, model, impl, data, tmp, args.max_batches, env)
                    results.append(r)
                    if "failed" not in r:
                        print(
                            f"  {n:>7} {impl:<8} {r['epoch_cpu_s']:8.2f} s/epoch cpu {r['epoch_wall_s']:8.2f} wall "
                            f"{r['ms_per_batch_cpu']:7.1f} ms/batch  setup {r['setup_wall_s']:6.1f}s  "
                            f"+{r['peak_mb']:.0f} MiB  ({_fmt_timed(r)})",
                            flush=True,
                        )
                data.unlink()
            del full
    total = time.perf_counter() - t_start

    report = common.Report(
        "scaling",
        settings={
            "sizes": sizes,
            "models": args.models,
            "genes": {m: GENES[m] for m in args.models},
            "batch_size": {m: BATCH_SIZE[m] for m in args.models},
            "max_batches": args.max_batches,
            "amici_neighbors": AMICI_NEIGHBORS,
            "threads": 1,
            "total_s": round(total, 1),
        },
    )
    header = ["model", "impl", "cells", "genes", "s/epoch (CPU)", "s/epoch (wall)", "ms/batch (CPU)", "timed",
              "setup s", "peak MiB"]  # fmt: skip
    rows = []
    ok = [r for r in results if "failed" not in r]
    order = {m: i for i, m in enumerate(MODELS)}
    ok.sort(key=lambda r: (order[r["model"]], r["n_cells"], r["impl"] != "original"))
    print(f"\n{'model':<7} {'impl':<8} {'cells':>7} {'genes':>5} {'s/epoch cpu':>11} {'wall':>8} "
          f"{'ms/batch':>8} {'timed':>16} {'setup s':>7} {'peak MiB':>8}")  # fmt: skip
    for r in ok:
        row = [r["model"], r["impl"], r["n_cells"], r["n_genes"], r["epoch_cpu_s"], r["epoch_wall_s"],
               r["ms_per_batch_cpu"], _fmt_timed(r), r["setup_wall_s"], r["peak_mb"]]  # fmt: skip
        rows.append([round(c, 4) if isinstance(c, float) else c for c in row])
        print(f"{row[0]:<7} {row[1]:<8} {row[2]:>7} {row[3]:>5} {row[4]:>11.2f} {row[5]:>8.2f} {row[6]:>8.1f} "
              f"{row[7]:>16} {row[8]:>7.1f} {row[9]:>8.0f}")  # fmt: skip
    report.table("Seconds per training epoch (one torch thread)", header, rows)

    # growth: per-epoch CPU time relative to linear in cells (1.0 = linear), against the smallest size
    growth_rows = []
    for model in args.models:
        for impl in ("cellvi", "original"):
            rs = sorted(
                (r for r in ok if r["model"] == model and r["impl"] == impl), key=lambda r: r["n_cells"]
            )
            if len(rs) < 2:
                continue
            base = rs[0]
            for r in rs[1:]:
                cells = r["n_cells"] / base["n_cells"]
                time_ratio = r["epoch_cpu_s"] / base["epoch_cpu_s"]
                growth_rows.append(
                    [model, impl, f"{base['n_cells']} -> {r['n_cells']}", round(cells, 2), round(time_ratio, 3),
                     round(time_ratio / cells, 3)]
                )  # fmt: skip
    if growth_rows:
        report.table(
            "Growth of the CPU time per epoch (x cells, x time, time / cells: 1.0 is linear)",
            ["model", "impl", "cells", "x cells", "x time", "x time / x cells"],
            growth_rows,
        )
        print("\ngrowth (CPU time per epoch against the smallest size; 1.0 = linear in cells)")
        for row in growth_rows:
            print(
                f"  {row[0]:<7} {row[1]:<8} {row[2]:>18}  x{row[3]:<6} cells  x{row[4]:<6} time  {row[5]:.2f}"
            )

    for model in args.models:
        for n in sizes:
            c = next(
                (r for r in ok if r["model"] == model and r["impl"] == "cellvi" and r["n_cells"] == n), None
            )
            o = next(
                (r for r in ok if r["model"] == model and r["impl"] == "original" and r["n_cells"] == n), None
            )
            if c is None:
                continue
            report.speed(
                f"{model} epoch, {n} cells", c["epoch_cpu_s"], o["epoch_cpu_s"] if o else None, "cpu"
            )
            report.memory(f"{model} setup + epoch, {n} cells", c["peak_mb"], o["peak_mb"] if o else None)
    for r in results:
        if "failed" in r:
            report.note(f"{r['model']} {r['impl']} failed: {r['failed'][:200]}")
    for line in skipped:
        report.note(line)
        print(line)
    report.note(
        "s/epoch: one epoch of the training cells (90%), timed from the epoch's start to its last training "
        "minibatch; 'k/K batches': k minibatches run and the time scaled by K/k"
    )
    report.note(f"total run time {total / 60:.1f} min")
    print(f"\ntotal {total / 60:.1f} min")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
