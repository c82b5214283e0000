"""cellvi.SCAR against scvi.external.SCAR: same simulated data, same settings, one process, one thread.

Prints training throughput (cells/s, CPU and wall time), get_ambient_profile and
get_denoised_counts times, peak memory growth, and quality against the simulated truth;
``--json PATH`` also writes them for ``run_all.py``. Usage::

    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/scar.py \
        [--n-cells 2000 --n-genes 2000 --n-empty 20000 --epochs 100] [--json PATH]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Report, add_json_argument, measure


def timed(fn):
    m = measure(fn)
    return m.result, m.wall_s, m.cpu_s, m.peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-empty", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--likelihood", default="b")
    add_json_argument(parser)
    args = parser.parse_args()
    report = Report(
        "scar",
        settings={
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "n_empty": args.n_empty,
            "epochs": args.epochs,
            "likelihood": args.likelihood,
            "batch_size": 128,
            "threads": 1,
        },
    )

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import scvi

    import cellvi
    from cellvi.scar._metrics import ambient_removal_summary, profile_match

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata, raw = cellvi.data.simulate_ambient(
        n_cells=args.n_cells, n_genes=args.n_genes, n_empty=args.n_empty, n_damaged=300, seed=0
    )
    true_prof = adata.varm["ambient_profile_true"][:, 0]
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes, {raw.n_obs} raw droplets; torch threads 1; "
          f"likelihood {args.likelihood!r}, {args.epochs} epochs, batch_size 128 (both)")

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
    _, w_o, c_o, p_o = timed(lambda: scvi.external.SCAR.get_ambient_profile(a_orig, raw, prob=0.9))
    m_o = profile_match(np.asarray(a_orig.varm["ambient_profile"]).ravel(), true_prof)
    a_new = adata.copy()
    prof, w_n, c_n, p_n = timed(lambda: cellvi.SCAR.get_ambient_profile(a_new, raw))
    m_n = profile_match(prof.iloc[:, 0], true_prof)
    print(f"scvi  prob=0.9     : {w_o:6.2f}s wall {c_o:6.2f}s cpu  L1 {m_o['l1']:.4f} cosine {m_o['cosine']:.5f}")
    print(f"cellvi defaults    : {w_n:6.2f}s wall {c_n:6.2f}s cpu  L1 {m_n['l1']:.4f} cosine {m_n['cosine']:.5f}")
    print(f"speed-up (cpu time): {c_o / c_n:.1f}x")
    report.speed("get_ambient_profile (scvi prob=0.9)", cellvi_s=c_n, original_s=c_o, clock="cpu")
    report.memory("get_ambient_profile", cellvi_mb=p_n, original_mb=p_o)
    report.quality("ambient profile L1 to truth", m_n["l1"], m_o["l1"], better="lower")

    # -- training ----------------------------------------------------------------------------------
    print("\n== training (same ambient profile: cellvi's estimate) ==")
    results = {}
    for name in ("scvi", "cellvi"):
        scvi.settings.seed = 0
        a = adata.copy()
        if name == "scvi":
            scvi.external.SCAR.setup_anndata(a)
            model = scvi.external.SCAR(a, ambient_profile=prof.to_numpy()[:, 0], gene_likelihood=args.likelihood)
        else:
            cellvi.SCAR.setup_anndata(a)
            model = cellvi.SCAR(a, ambient_profile=prof, gene_likelihood=args.likelihood)
        _, wall, cpu, peak = timed(
            lambda m=model: m.train(max_epochs=args.epochs, batch_size=128, enable_progress_bar=False)
        )
        n_seen = args.epochs * int(round(0.9 * a.n_obs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            den, _, den_cpu, den_peak = timed(model.get_denoised_counts)
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
        s = ambient_removal_summary(a.X, den, a.layers["native"])
        s["rho_corr"] = float(np.corrcoef(rho, a.obs["ambient_fraction"])[0, 1])
        s["rho_mean"] = float(np.mean(rho))
        results[name] = (wall, cpu, n_seen, s, peak, den_cpu, den_peak)
        print(f"{name:6s}: {wall:7.1f}s wall {cpu:7.1f}s cpu  {n_seen / cpu:8.0f} cells/s (cpu)  {n_seen / wall:8.0f} cells/s (wall)")
    (wo, co, n, so, po, dco, dpo), (wn, cn, _, sn, pn, dcn, dpn) = results["scvi"], results["cellvi"]
    print(f"training throughput ratio cellvi/scvi: {co / cn:.2f}x (cpu time), {wo / wn:.2f}x (wall)")
    print(f"get_denoised_counts: scvi {dco:.2f}s cpu, cellvi {dcn:.2f}s cpu ({dco / dcn:.1f}x)")
    print(f"peak memory growth (MiB): training scvi {po:.0f} cellvi {pn:.0f}; "
          f"get_denoised_counts scvi {dpo:.0f} cellvi {dpn:.0f}")
    report.speed(f"training ({n / args.epochs:.0f} cells x {args.epochs} epochs)", cn, co, clock="cpu")
    report.speed("get_denoised_counts", dcn, dco, clock="cpu")
    report.memory("training", pn, po)
    report.memory("get_denoised_counts", dpn, dpo)

    print(f"\n== quality against the truth (true mean contamination {adata.obs['ambient_fraction'].mean():.3f}) ==")
    keys = [("corr_observed", "per-cell log1p corr, observed"), ("corr_denoised", "per-cell log1p corr, denoised"),
            ("rmse_observed", "RMSE to native, observed"), ("rmse_denoised", "RMSE to native, denoised"),
            ("native_removed", "native counts removed"), ("ambient_removed", "ambient counts removed"),
            ("entries_above_observed", "entries above observed"), ("rho_corr", "contamination corr with truth"),
            ("rho_mean", "mean estimated contamination")]
    print(f"{'':34s} {'scvi':>9s} {'cellvi':>9s}")
    for k, label in keys:
        print(f"{label:34s} {so[k]:9.3f} {sn[k]:9.3f}")
    better = {"corr_denoised": "higher", "rmse_denoised": "lower", "native_removed": "lower",
              "ambient_removed": "higher", "rho_corr": "higher"}
    for k, label in keys:
        if k in better:
            report.quality(label, sn[k], so[k], better=better[k])
    report.write(args.json)


if __name__ == "__main__":
    main()
