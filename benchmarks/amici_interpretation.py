"""Benchmark: the AMICI interpretation suite, cellvi.interpretation against ``amici-st`` 0.1.0, one run.

Usage::

    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/amici_interpretation.py \
        [--n-cells 3000] [--n-genes 100] [--epochs 2] [--skip-original] [--json PATH]

Reuses the original's environment of ``benchmarks/amici.py`` (``benchmarks/_envs/amici-st``, built there on
first use) and its model hyperparameters (the paper's: 8 heads of size 32, ...). Each implementation runs
in its own subprocess with ``torch.set_num_threads(1)`` on the same simulated tissue
(:func:`cellvi.data.simulate_spatial`) with the same neighbours (K nearest other-type cells), trains for
``--epochs`` epochs (interpretation cost does not depend on how well the model fits), then runs the full
interpretation suite with the original's defaults:

* attention patterns (vanilla) of every cell;
* explained variance of every (head, cell type) with the permutation test (``n_permutations`` from alpha);
* neighbour ablation of every receiver type against every sender type, with z-values;
* counterfactual attention of every receiver type and the length scales of every (head, sender type).

cellvi additionally computes communication hubs and bootstrap confidence intervals of the length scales
(not in the 0.1.0 wheel; counted in cellvi's total). Printed: seconds per step and the ratio.
``--json PATH`` also writes CPU seconds and peak memory growth per step (``_common.Report``) for
``run_all.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _common():
    """``benchmarks/_common.py`` loaded by path (the original's worker drops this folder from sys.path)."""
    if "_common" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_common", HERE / "_common.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_common"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["_common"]


def _training_bench():
    """``benchmarks/amici.py`` (its environment builder and hyperparameters), loaded by path."""
    spec = importlib.util.spec_from_file_location("_amici_training_bench", HERE / "amici.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- worker (runs in either env)
def worker(impl: str, data: str, out: str, epochs: int, n_neighbors: int, n_permutations: int | None):
    import torch

    torch.set_num_threads(1)
    import anndata as ad
    import scvi

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    if impl == "original":
        # this script's folder holds benchmarks/amici.py, which would shadow the original package
        sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != HERE]
        sys.modules.pop("amici", None)
        from amici import AMICI
        from amici.interpretation import (
            AMICIAblationModule,
            AMICIAttentionModule,
            AMICICounterfactualAttentionModule,
            AMICIExplainedVarianceModule,
        )
    else:
        from cellvi.amici import AMICI
        from cellvi.interpretation import (
            AMICIAblationModule,
            AMICIAttentionModule,
            AMICICounterfactualAttentionModule,
            AMICIExplainedVarianceModule,
        )

    adata = ad.read_h5ad(data)
    AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=n_neighbors)
    model = AMICI(adata, **_training_bench().MODEL_KWARGS)
    model.train(max_epochs=epochs, batch_size=128, plan_kwargs={"lr": 1e-3}, enable_progress_bar=False,
                accelerator="cpu")
    cell_types = list(adata.obs["cell_type"].cat.categories)
    quiet = {} if impl == "original" else {"prog_bar": False}
    times, cpu, peaks = {}, {}, {}
    measure = _common().measure

    def timed(name, fn):
        m = measure(fn)
        times[name], cpu[name], peaks[name] = m.wall_s, m.cpu_s, m.peak_mb
        print(f"  {impl} {name}: {times[name]:.2f}s", flush=True)
        return m.result

    att = timed("attention patterns", lambda: AMICIAttentionModule.compute(model, flavor="vanilla", **quiet))
    timed("explained variance + permutation test",
          lambda: AMICIExplainedVarianceModule.compute(model, run_permutation_test=True, n_permutations=n_permutations,
                                                       **quiet))
    timed("neighbour ablation + z-values",
          lambda: AMICIAblationModule.compute(model, None, None, compute_z_value=True, **quiet))

    def counterfactual():
        for ct in cell_types:
            cf = AMICICounterfactualAttentionModule.compute(model, ct, **quiet)
            senders = [s for s in cell_types if s != ct]
            heads = list(range(model.module.n_heads))
            if impl == "original":
                cf._calculate_length_scales(heads, senders, attention_threshold=0.1)
            else:
                cf.calculate_length_scales(heads, senders, attention_threshold=0.1)

    timed("counterfactual attention + length scales", counterfactual)
    if impl == "cellvi":
        def extras():
            att.compute_communication_hubs()
            cf = AMICICounterfactualAttentionModule.compute(model, cell_types[0], prog_bar=False)
            cf.length_scale_confidence_intervals(attention_threshold=0.1, n_bootstrap=10_000)

        timed("extras: communication hubs + bootstrap CIs (cellvi only)", extras)
    Path(out).write_text(json.dumps({"impl": impl, "times": times, "cpu": cpu, "peak_mb": peaks,
                                     "n_params": int(sum(p.numel() for p in model.module.parameters()))}))


# ---------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-genes", type=int, default=100)
    p.add_argument("--n-neighbors", type=int, default=30)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-permutations", type=int, default=None, help="default: the original's, from alpha=0.05")
    p.add_argument("--skip-original", action="store_true", help="time cellvi only")
    p.add_argument("--worker", choices=["cellvi", "original"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    _common().add_json_argument(p)
    args = p.parse_args(argv)

    if args.worker:
        worker(args.worker, args.data, args.out, args.epochs, args.n_neighbors, args.n_permutations)
        return 0

    from cellvi.data import simulate_spatial

    adata = simulate_spatial(n_cells=args.n_cells, n_genes=args.n_genes, seed=0)
    runs = [("cellvi", sys.executable)]
    if not args.skip_original:
        runs.append(("original", _training_bench().ensure_env()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tissue.h5ad"
        adata.write_h5ad(data)
        for impl, python in runs:
            out = Path(tmp) / f"{impl}.json"
            cmd = [str(python), __file__, "--worker", impl, "--data", str(data), "--out", str(out),
                   "--epochs", str(args.epochs), "--n-neighbors", str(args.n_neighbors)]
            if args.n_permutations is not None:
                cmd += ["--n-permutations", str(args.n_permutations)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **_common().allocator_env()}
            if impl == "cellvi":
                env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
            print(f"running {impl} ...", flush=True)
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("  ")), flush=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"{impl} run failed")
            results.append(json.loads(out.read_text()))

    print(f"\nAMICI interpretation benchmark: {args.n_cells} cells x {args.n_genes} genes, 4 cell types, "
          f"K={args.n_neighbors}, paper-size model ({results[0]['n_params']:,} parameters), 1 CPU thread")
    by = {r["impl"]: r["times"] for r in results}
    steps = list(by["cellvi"])
    print(f"{'step':<58}{'cellvi s':>10}{'original s':>12}{'ratio':>8}")
    for step in steps:
        c, o = by["cellvi"][step], by.get("original", {}).get(step)
        ratio = f"{o / c:>7.1f}x" if o is not None else "       -"
        print(f"{step:<58}{c:>10.2f}{(f'{o:.2f}' if o is not None else '-'):>12}{ratio}")
    total_c = sum(by["cellvi"].values())
    if "original" in by:
        total_o = sum(by["original"].values())
        print(f"{'full suite (cellvi incl. extras)':<58}{total_c:>10.2f}{total_o:>12.2f}{total_o / total_c:>7.1f}x")
    else:
        print(f"{'full suite':<58}{total_c:>10.2f}")

    report = _common().Report(
        "amici_interpretation",
        settings={"n_cells": args.n_cells, "n_genes": args.n_genes, "n_neighbors": args.n_neighbors,
                  "epochs": args.epochs, "n_permutations": args.n_permutations, "threads": 1},
    )
    res = {r["impl"]: r for r in results}
    orig = res.get("original", {"cpu": {}, "peak_mb": {}})
    for step in steps:
        report.speed(step, res["cellvi"]["cpu"][step], orig["cpu"].get(step), clock="cpu")
        report.memory(step, res["cellvi"]["peak_mb"][step], orig["peak_mb"].get(step))
    shared = [s for s in steps if s in orig["cpu"]]
    if shared:
        report.speed("full suite (steps both have)", sum(res["cellvi"]["cpu"][s] for s in shared),
                     sum(orig["cpu"][s] for s in shared), clock="cpu")
    else:
        report.note("original not run (--skip-original)")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
