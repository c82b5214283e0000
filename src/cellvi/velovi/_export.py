"""Write VELOVI results where scVelo and CellRank read them."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData

from cellvi._validation import check_positive_int

from ._constants import VELOVI_REGISTRY_KEYS


def write_velovi_results(
    model,
    adata: AnnData | None = None,
    n_samples: int = 25,
    uncertainty: bool = True,
    unscaled_rates: bool = False,
    batch_size: int | None = None,
) -> AnnData:
    """Write velocities, latent time, fit parameters and uncertainty in scVelo's and CellRank's places.

    After this one call, ``scvelo.tl.velocity_graph(adata)``, ``scvelo.pl.velocity_embedding_stream`` and
    ``cellrank.kernels.VelocityKernel(adata)`` work without glue code. Times are rescaled per gene to
    ``[0, 20]`` (``scaling = 20 / max_cells t``) and velocities and rates divided by the same factor, as in
    the veloVI tutorial.

    Parameters
    ----------
    model
        A trained :class:`cellvi.VELOVI`.
    adata
        AnnData to write to, registered with the model (default: the model's AnnData).
    n_samples
        Posterior samples averaged for velocity and latent time (and drawn for the uncertainty).
    uncertainty
        Also compute the directional (intrinsic) uncertainty per cell.
    unscaled_rates
        Report ``fit_alpha``/``fit_beta`` in the units of the data before min-max scaling (needs the
        ``var['velovi_{spliced,unspliced}_range']`` columns written by :func:`preprocess_data`):
        ``alpha * range(u)``, ``beta * range(s) / range(u)``; ``gamma`` is unchanged. Velocities stay in the
        units of the registered layers, which scVelo compares them with.
    batch_size
        Minibatch size for the posterior passes.

    Returns
    -------
    ``adata``, with

    - ``layers['velocity']`` (ds/dt), ``layers['velocity_u']`` (du/dt), ``layers['fit_t']`` (rescaled
      latent time) and ``layers['latent_time_velovi']`` (raw latent time), all float32 (cells x genes);
    - ``layers['Ms']`` / ``layers['Mu']``: the registered layers, if not already there under these names;
    - ``var['fit_alpha']``, ``var['fit_beta']``, ``var['fit_gamma']``, ``var['fit_t_']``,
      ``var['fit_scaling']`` (float64) and ``var['velocity_genes']`` (bool, all genes the model fits);
    - ``obs['velovi_latent_time']``: a cell-level time in [0, 1] (median of the genes' rescaled times,
      min-max scaled);
    - with ``uncertainty``, ``obs['directional_*']`` (the columns of
      :meth:`~cellvi.VELOVI.get_directional_uncertainty`) and ``obs['velocity_uncertainty']`` (=
      ``directional_cosine_sim_variance``);
    - ``uns['velocity_params']`` with ``mode='velovi'``.
    """
    if not getattr(model, "is_trained", False):
        raise ValueError("model is not trained; call model.train() first.")
    check_positive_int(n_samples, "n_samples", minimum=2 if uncertainty else 1)
    adata = model._validate_anndata(adata)
    if unscaled_rates and not {"velovi_spliced_range", "velovi_unspliced_range"} <= set(adata.var.columns):
        raise ValueError(
            "unscaled_rates=True needs adata.var['velovi_spliced_range'] and ['velovi_unspliced_range'], "
            "written by cellvi.velovi.preprocess_data(min_max_scale=True)."
        )

    t = model.get_latent_time(adata, n_samples=n_samples, batch_size=batch_size, return_numpy=True)
    v = model.get_velocity(adata, n_samples=n_samples, batch_size=batch_size, return_numpy=True)
    vu = model.get_velocity(
        adata, n_samples=n_samples, batch_size=batch_size, velo_mode="unspliced", return_numpy=True
    )
    t_max = t.max(axis=0)
    scaling = np.where(t_max > 0, 20.0 / np.where(t_max > 0, t_max, 1.0), 1.0)
    rates = model.get_rates()
    with torch.inference_mode():
        switch = model.module.switch_time().cpu().numpy()

    alpha, beta, gamma = rates["alpha"], rates["beta"], rates["gamma"]
    if unscaled_rates:
        r_s = adata.var["velovi_spliced_range"].to_numpy()
        r_u = adata.var["velovi_unspliced_range"].to_numpy()
        alpha, beta = alpha * r_u, beta * r_s / r_u

    adata.layers["velocity"] = (v / scaling).astype(np.float32)
    adata.layers["velocity_u"] = (vu / scaling).astype(np.float32)
    fit_t = (t * scaling).astype(np.float32)
    adata.layers["fit_t"] = fit_t
    adata.layers["latent_time_velovi"] = t.astype(np.float32)
    for name, key in (("Ms", VELOVI_REGISTRY_KEYS.X_KEY), ("Mu", VELOVI_REGISTRY_KEYS.U_KEY)):
        layer = next(f.attr_key for f in model.adata_manager.fields if f.registry_key == key)
        if name not in adata.layers:
            adata.layers[name] = adata.layers[layer]
    adata.var["fit_alpha"] = (alpha / scaling).astype(np.float64)
    adata.var["fit_beta"] = (beta / scaling).astype(np.float64)
    adata.var["fit_gamma"] = (gamma / scaling).astype(np.float64)
    adata.var["fit_t_"] = (switch * scaling).astype(np.float64)
    adata.var["fit_scaling"] = np.ones(adata.n_vars, dtype=np.float64)
    adata.var["velocity_genes"] = np.ones(adata.n_vars, dtype=bool)

    cell_time = np.median(fit_t, axis=1).astype(np.float64)
    span = cell_time.max() - cell_time.min()
    adata.obs["velovi_latent_time"] = (
        (cell_time - cell_time.min()) / span if span > 0 else np.zeros_like(cell_time)
    )
    if uncertainty:
        stats, _ = model.get_directional_uncertainty(adata, n_samples=n_samples)
        for col in stats.columns:
            adata.obs[col] = stats[col].to_numpy(dtype=np.float64)
        adata.obs["velocity_uncertainty"] = stats["directional_cosine_sim_variance"].to_numpy(
            dtype=np.float64
        )
    adata.uns["velocity_params"] = {"mode": "velovi", "n_samples": int(n_samples), "fit_t_max": 20.0}
    return adata
