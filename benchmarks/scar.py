"""cellvi.SCAR against scvi.external.SCAR: same simulated data, same settings, one thread.

Prints training throughput (cells/s, CPU and wall time), get_ambient_profile and
get_denoised_counts times, peak memory growth, and quality against the simulated truth;
``--json PATH`` also writes them for ``run_all.py``. Times and quality come from one process
(the original first, then cellvi, on the same data; get_denoised_counts: the median of three calls
per side, interleaved). Peak memory comes from fresh subprocesses,
one per side and step (ambient profile; training then get_denoised_counts), so neither side runs
in memory the other has freed. Usage::

    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/scar.py \
        [--n-cells 2000 --n-genes 2000 --n-empty 20000 --epochs 100] [--json PATH]

Both sides run with the glibc heap thresholds that cellvi's training sets for its process
(``_common.same_allocator``, set before anything is timed).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Report, add_json_argument, measure, same_allocator


def timed(fn):
    m = measure(fn)
    return m.result, m.wall_s, m.cpu_s, m.peak_mb


def _simulate(args):
    import cellvi

    return cellvi.data.simulate_ambient(
        n_cells=args.n_cells, n_genes=args.n_genes, n_empty=args.n_empty, n_damaged=300, seed=args.seed
    )


def _setup(args) -> None:
    """One torch thread, quiet Lightning, the run's seed, no loader workers (main run and memory workers)."""
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import scvi

    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0


def _make_model(side: str, adata, profile, likelihood: str):
    """``scvi.external.SCAR`` (side ``"scvi"``) or ``cellvi.SCAR`` set up on ``adata`` with ``profile``."""
    import scvi

    import cellvi

    cls = scvi.external.SCAR if side == "scvi" else cellvi.SCAR
    cls.setup_anndata(adata)
    return cls(adata, ambient_profile=profile, gene_likelihood=likelihood)


def _train(model, args) -> None:
    model.train(max_epochs=args.epochs, batch_size=128, enable_progress_bar=False)


def _memory_worker(args) -> None:
    """One side, one step, in a fresh process: print the peak memory growth (MiB) as JSON."""
    side, step = args.memory_worker.split(":")
    _setup(args)
    import scvi

    import cellvi

    adata, raw = _simulate(args)
    out = {}
    if step == "profile":
        if side == "scvi":
            fn = lambda: scvi.external.SCAR.get_ambient_profile(adata, raw, prob=0.9)
        else:
            fn = lambda: cellvi.SCAR.get_ambient_profile(adata, raw)
        out["get_ambient_profile"] = measure(fn).peak_mb
    else:
        model = _make_model(side, adata, np.load(args.profile), args.likelihood)
        out["training"] = measure(lambda: _train(model, args)).peak_mb
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["get_denoised_counts"] = measure(model.get_denoised_counts).peak_mb
    print("MEMORY " + json.dumps(out))


def _memory(args, side: str, step: str, profile_path: str) -> dict:
    # the run's own options (data, epochs, likelihood, seed); the worker returns before --json is read
    cmd = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--memory-worker",
        f"{side}:{step}",
        "--profile",
        profile_path,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker {side}:{step} failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1][len("MEMORY ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-empty", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--likelihood", default="b")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of both models (default 0)")
    parser.add_argument(
        "--skip-memory", action="store_true", help="no memory subprocesses (times and quality only)"
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args()
    same_allocator()
    if args.memory_worker:
        _memory_worker(args)
        return
    report = Report(
        "scar",
        settings={
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "n_empty": args.n_empty,
            "epochs": args.epochs,
            "likelihood": args.likelihood,
            "seed": args.seed,
            "batch_size": 128,
            "threads": 1,
        },
    )

    _setup(args)
    import scvi

    import cellvi
    from cellvi.scar._metrics import ambient_removal_summary, profile_match

    adata, raw = _simulate(args)
    true_prof = adata.varm["ambient_profile_true"][:, 0]
    print(
        f"data: {adata.n_obs} cells x {adata.n_vars} genes, {raw.n_obs} raw droplets; torch threads 1; "
        f"likelihood {args.likelihood!r}, {args.epochs} epochs, batch_size 128 (both)"
    )

    # -- get_ambient_profile --------------------------------------------------------------------------
    print("\n== get_ambient_profile ==")
    a_orig = adata.copy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scvi.external.SCAR.get_ambient_profile(a_orig, raw)
        print("scvi  defaults (prob=0.995): ran")
    except Exception as err:  # noqa: BLE001 - report whatever the original raises
        print(f"scvi  defaults (prob=0.995): FAILED ({type(err).__name__}: {str(err)[:80]})")
        report.note(f"scvi get_ambient_profile with its defaults (prob=0.995) fails: {type(err).__name__}")
    _, w_o, c_o, _ = timed(lambda: scvi.external.SCAR.get_ambient_profile(a_orig, raw, prob=0.9))
    m_o = profile_match(np.asarray(a_orig.varm["ambient_profile"]).ravel(), true_prof)
    a_new = adata.copy()
    prof, w_n, c_n, _ = timed(lambda: cellvi.SCAR.get_ambient_profile(a_new, raw))
    m_n = profile_match(prof.iloc[:, 0], true_prof)
    print(
        f"scvi  prob=0.9     : {w_o:6.2f}s wall {c_o:6.2f}s cpu  L1 {m_o['l1']:.4f} cosine {m_o['cosine']:.5f}"
    )
    print(
        f"cellvi defaults    : {w_n:6.2f}s wall {c_n:6.2f}s cpu  L1 {m_n['l1']:.4f} cosine {m_n['cosine']:.5f}"
    )
    print(f"speed-up (cpu time): {c_o / c_n:.1f}x")
    report.speed("get_ambient_profile (scvi prob=0.9)", cellvi_s=c_n, original_s=c_o, clock="cpu")
    report.quality("ambient profile L1 to truth", m_n["l1"], m_o["l1"], better="lower")

    # -- training ----------------------------------------------------------------------------------
    print("\n== training (same ambient profile: cellvi's estimate) ==")
    results, models = {}, {}
    for name in ("scvi", "cellvi"):
        scvi.settings.seed = args.seed
        a = adata.copy()
        model = _make_model(name, a, prof.to_numpy()[:, 0] if name == "scvi" else prof, args.likelihood)
        models[name] = model
        _, wall, cpu, _ = timed(lambda m=model: _train(m, args))
        n_seen = args.epochs * round(0.9 * a.n_obs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            den, _, den_cpu, _ = timed(model.get_denoised_counts)
        if name == "scvi":
            # the original has no accessor for rho: decode it from the posterior mean of z
            import torch as t

            mod = model.module
            mod.eval()
            x = t.tensor(a.X.toarray())
            with t.inference_mode():
                enc = mod.z_encoder(t.log1p(x))
                qz_m = enc[0].loc if hasattr(enc[0], "loc") else enc[0]
                rho = mod.decoder.px_noise_decoder(mod.decoder.px_decoder(qz_m)).numpy().ravel()
        else:
            rho = model.get_contamination_fraction().to_numpy()
            median = ambient_removal_summary(
                a.X, model.get_denoised_counts(threshold=0.5), a.layers["native"]
            )
            balanced_at = float(model.module.training_contamination)
        s = ambient_removal_summary(a.X, den, a.layers["native"])
        s["rho_corr"] = float(np.corrcoef(rho, a.obs["ambient_fraction"])[0, 1])
        s["rho_mean"] = float(np.mean(rho))
        results[name] = (wall, cpu, n_seen, s, [den_cpu])
        print(
            f"{name:6s}: {wall:7.1f}s wall {cpu:7.1f}s cpu  {n_seen / cpu:8.0f} cells/s (cpu)  {n_seen / wall:8.0f} cells/s (wall)"
        )
    # get_denoised_counts takes a fraction of a second: two more calls each, interleaved, and the median
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            for name in ("scvi", "cellvi"):
                results[name][4].append(timed(models[name].get_denoised_counts)[2])
    (wo, co, n, so, dto), (wn, cn, _, sn, dtn) = results["scvi"], results["cellvi"]
    dco, dcn = float(np.median(dto)), float(np.median(dtn))
    print(f"training throughput ratio cellvi/scvi: {co / cn:.2f}x (cpu time), {wo / wn:.2f}x (wall)")
    print(
        f"get_denoised_counts (median of 3 interleaved calls, first one cold): scvi {dco:.3f}s cpu "
        f"({', '.join(f'{t:.3f}' for t in dto)}), cellvi {dcn:.3f}s cpu ({', '.join(f'{t:.3f}' for t in dtn)}) "
        f"({dco / dcn:.1f}x)"
    )
    report.speed(f"training ({n / args.epochs:.0f} cells x {args.epochs} epochs)", cn, co, clock="cpu")
    report.speed("get_denoised_counts (median of 3 calls)", dcn, dco, clock="cpu")

    if not args.skip_memory:
        print("\n== peak memory growth (MiB), each side and step in a fresh process ==")
        with tempfile.TemporaryDirectory() as tmp:
            profile_path = str(Path(tmp) / "profile.npy")
            np.save(profile_path, prof.to_numpy()[:, 0])
            mem = {
                side: {
                    **_memory(args, side, "profile", profile_path),
                    **_memory(args, side, "train", profile_path),
                }
                for side in ("scvi", "cellvi")
            }
        for what in ("get_ambient_profile", "training", "get_denoised_counts"):
            print(f"{what:22s} scvi {mem['scvi'][what]:8.1f}  cellvi {mem['cellvi'][what]:8.1f}")
            report.memory(what, cellvi_mb=mem["cellvi"][what], original_mb=mem["scvi"][what])

    print(
        f"\n== quality against the truth (true mean contamination {adata.obs['ambient_fraction'].mean():.3f}) =="
    )
    keys = [
        ("corr_observed", "per-cell log1p corr, observed"),
        ("corr_denoised", "per-cell log1p corr, denoised"),
        ("rmse_observed", "RMSE to native, observed"),
        ("rmse_denoised", "RMSE to native, denoised"),
        ("native_removed", "native counts removed"),
        ("ambient_removed", "ambient counts removed"),
        ("entries_above_observed", "entries above observed"),
        ("rho_corr", "contamination corr with truth"),
        ("rho_mean", "mean estimated contamination"),
    ]
    print(f"{'':34s} {'scvi':>9s} {'cellvi':>9s}")
    for k, label in keys:
        print(f"{label:34s} {so[k]:9.3f} {sn[k]:9.3f}")
    better = {
        "corr_denoised": "higher",
        "rmse_denoised": "lower",
        "native_removed": "lower",
        "ambient_removed": "higher",
        "rho_corr": "higher",
    }
    for k, label in keys:
        if k in better:
            report.quality(label, sn[k], so[k], better=better[k])
    print(
        f"\ncellvi get_denoised_counts thresholds (same model): 'balanced' (default, the training "
        f"contamination {balanced_at:.3f}) and 0.5 (posterior median)"
    )
    rows = []
    show = ["corr_denoised", "rmse_denoised", "native_removed", "ambient_removed"]
    for k in show:
        print(f"{dict(keys)[k]:34s} {sn[k]:9.3f} {median[k]:9.3f}")
        rows.append([dict(keys)[k], round(sn[k], 4), round(median[k], 4)])
    report.table(
        f"cellvi get_denoised_counts: threshold 'balanced' (default, {balanced_at:.3f}) vs 0.5 (posterior median)",
        ["metric", "balanced", "0.5"],
        rows,
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
