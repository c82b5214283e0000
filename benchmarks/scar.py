"""cellvi.SCAR against scvi.external.SCAR: same simulated data, same settings, one process, one thread.

Prints training throughput (cells/s, CPU and wall time), get_ambient_profile time, and quality
against the simulated truth. Usage::

    .venv/bin/python benchmarks/scar.py [--n-cells 2000 --n-genes 2000 --n-empty 20000 --epochs 100]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-empty", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--likelihood", default="b")
    args = parser.parse_args()

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
    _, w_o, c_o = timed(lambda: scvi.external.SCAR.get_ambient_profile(a_orig, raw, prob=0.9))
    m_o = profile_match(np.asarray(a_orig.varm["ambient_profile"]).ravel(), true_prof)
    a_new = adata.copy()
    prof, w_n, c_n = timed(lambda: cellvi.SCAR.get_ambient_profile(a_new, raw))
    m_n = profile_match(prof.iloc[:, 0], true_prof)
    print(f"scvi  prob=0.9     : {w_o:6.2f}s wall {c_o:6.2f}s cpu  L1 {m_o['l1']:.4f} cosine {m_o['cosine']:.5f}")
    print(f"cellvi defaults    : {w_n:6.2f}s wall {c_n:6.2f}s cpu  L1 {m_n['l1']:.4f} cosine {m_n['cosine']:.5f}")
    print(f"speed-up (cpu time): {c_o / c_n:.1f}x")

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
        _, wall, cpu = timed(lambda m=model: m.train(max_epochs=args.epochs, batch_size=128, enable_progress_bar=False))
        n_seen = args.epochs * int(round(0.9 * a.n_obs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            den = model.get_denoised_counts()
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
        results[name] = (wall, cpu, n_seen, s)
        print(f"{name:6s}: {wall:7.1f}s wall {cpu:7.1f}s cpu  {n_seen / cpu:8.0f} cells/s (cpu)  {n_seen / wall:8.0f} cells/s (wall)")
    (wo, co, n, so), (wn, cn, _, sn) = results["scvi"], results["cellvi"]
    print(f"training throughput ratio cellvi/scvi: {co / cn:.2f}x (cpu time), {wo / wn:.2f}x (wall)")

    print(f"\n== quality against the truth (true mean contamination {adata.obs['ambient_fraction'].mean():.3f}) ==")
    keys = [("corr_observed", "per-cell log1p corr, observed"), ("corr_denoised", "per-cell log1p corr, denoised"),
            ("rmse_observed", "RMSE to native, observed"), ("rmse_denoised", "RMSE to native, denoised"),
            ("native_removed", "native counts removed"), ("ambient_removed", "ambient counts removed"),
            ("entries_above_observed", "entries above observed"), ("rho_corr", "contamination corr with truth"),
            ("rho_mean", "mean estimated contamination")]
    print(f"{'':34s} {'scvi':>9s} {'cellvi':>9s}")
    for k, label in keys:
        print(f"{label:34s} {so[k]:9.3f} {sn[k]:9.3f}")


if __name__ == "__main__":
    main()
