"""``make demo`` section: VELOVI on simulated switching kinetics, compared with the ground truth."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run(out_dir: Path, quick: bool = False) -> None:
    """Simulate, preprocess, train, summarise against the truth and write ``velovi.h5ad`` under ``out_dir``."""
    import scvi
    from scipy.stats import spearmanr

    import cellvi
    from cellvi._io import write_h5ad
    from cellvi.velovi import VELOVI, compute_moments, preprocess_data, write_velovi_results

    scvi.settings.seed = 0
    n_obs, n_vars, epochs = (500, 30, 100) if quick else (1000, 50, 200)
    adata = cellvi.data.simulate_velocity(n_obs=n_obs, n_vars=n_vars, seed=0)
    # 50 co-regulated genes: total-count normalisation would remove most of the signal, so it is off here
    compute_moments(adata, n_neighbors=30, normalize=False)
    adata = preprocess_data(adata, filter_on_r2=False)
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes (switching ODE, one true time per cell)")

    VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    model = VELOVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    print(f"trained {len(model.history['elbo_train'])} epochs in {time.perf_counter() - t0:.1f}s")

    write_velovi_results(model, adata, n_samples=25)
    truth_v = adata.layers["true_velocity"]
    moving = np.abs(truth_v) > 0.1 * np.abs(truth_v).max(axis=0)
    agree = np.sign(adata.layers["velocity"]) == np.sign(truth_v)
    rho = spearmanr(adata.obs["velovi_latent_time"], adata.obs["true_time"])[0]
    rates = model.get_rates()
    ratio = (
        rates["gamma"]
        / rates["beta"]
        * adata.var["velovi_unspliced_range"]
        / adata.var["velovi_spliced_range"]
    )
    ratio_r = np.corrcoef(ratio, adata.var["true_gamma"] / adata.var["true_beta"])[0, 1]
    unc = adata.obs["velocity_uncertainty"]

    print("                                   before (steady-state fit)   VELOVI")
    ss = adata.layers["Mu"] - adata.var["velocity_gamma"].to_numpy() * adata.layers["Ms"]
    ss_agree = (np.sign(ss) == np.sign(truth_v))[moving].mean()
    print(f"velocity sign agreement (moving):  {ss_agree:>10.3f}                {agree[moving].mean():.3f}")
    print(f"latent time Spearman vs truth:     {'-':>10}                {rho:.3f}")
    print(f"gamma/beta Pearson vs truth:       {'-':>10}                {ratio_r:.3f}")
    print(f"directional uncertainty: median {np.median(unc):.2e}, max {unc.max():.2e}")
    path = write_h5ad(adata, Path(out_dir) / "velovi.h5ad")
    print(f"wrote {path}")
