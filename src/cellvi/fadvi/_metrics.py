"""Disentanglement evaluation: what each latent block reveals, measured by fresh probes on held-out cells.

The model's own heads are not used: a head trained jointly with an adversary can be fooled, and a
fresh probe is what a downstream analysis would be. Classification targets are scored by balanced
accuracy (chance = 1 / n_classes, whatever the class balance); continuous targets by R^2 (chance 0).
Two probes are fit per pair, a linear one (logistic / ridge regression on standardised latents) and
a non-linear one (k-nearest neighbours); the reported ``score`` is the better of the two, so leakage
is not hidden by the choice of probe. No global warning filter is touched.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd


def _split(n: int, test_size: float, seed: int, strata: np.ndarray | None):
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        return train_test_split(idx, test_size=test_size, random_state=seed, stratify=strata)
    except ValueError:  # a class too small to stratify
        return train_test_split(idx, test_size=test_size, random_state=seed)


def _probe_classification(Z: np.ndarray, y: np.ndarray, test_size: float, seed: int, n_neighbors: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    classes, y_codes = np.unique(y, return_inverse=True)
    tr, te = _split(len(y_codes), test_size, seed, y_codes)
    scaler = StandardScaler().fit(Z[tr])
    Ztr, Zte = scaler.transform(Z[tr]), scaler.transform(Z[te])
    scores = {}
    if classes.size < 2 or np.unique(y_codes[tr]).size < 2:
        scores = {"linear": 1.0 / max(1, classes.size), "knn": 1.0 / max(1, classes.size)}
    else:
        lin = LogisticRegression(max_iter=500, C=1.0).fit(Ztr, y_codes[tr])
        scores["linear"] = balanced_accuracy_score(y_codes[te], lin.predict(Zte))
        knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(tr))).fit(Ztr, y_codes[tr])
        scores["knn"] = balanced_accuracy_score(y_codes[te], knn.predict(Zte))
    return {
        "metric": "balanced_accuracy",
        "chance": 1.0 / classes.size,
        "linear": float(scores["linear"]),
        "knn": float(scores["knn"]),
        "n_test": int(len(te)),
    }


def _probe_regression(Z: np.ndarray, y: np.ndarray, test_size: float, seed: int, n_neighbors: int) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    tr, te = _split(len(y), test_size, seed, None)
    scaler = StandardScaler().fit(Z[tr])
    Ztr, Zte = scaler.transform(Z[tr]), scaler.transform(Z[te])
    lin = RidgeCV(alphas=np.logspace(-3, 3, 7)).fit(Ztr, y[tr])
    knn = KNeighborsRegressor(n_neighbors=min(n_neighbors, len(tr))).fit(Ztr, y[tr])
    return {
        "metric": "r2",
        "chance": 0.0,
        "linear": float(r2_score(y[te], lin.predict(Zte))),
        "knn": float(r2_score(y[te], knn.predict(Zte))),
        "n_test": int(len(te)),
    }


def probe_latents(
    latents: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    *,
    continuous: tuple[str, ...] | list[str] = (),
    test_size: float = 0.3,
    seed: int = 0,
    n_neighbors: int = 15,
    max_cells: int | None = 20000,
) -> pd.DataFrame:
    """Probe every latent block for every target with fresh models fit on a train split.

    Parameters
    ----------
    latents
        Block name -> ``(n_cells, d)`` array (e.g. ``{"z_b": ..., "z_l": ..., "z_r": ...}``).
    targets
        Target name -> ``(n_cells,)`` array. Entries that are missing (``None``/NaN) are left out
        of that target's probe (e.g. unlabeled cells for the label).
    continuous
        Names of the targets that are continuous (scored by R^2); the others are categorical.
    test_size
        Fraction of cells held out for scoring.
    seed
        Seed of the split and of the subsampling.
    n_neighbors
        ``k`` of the nearest-neighbour probes.
    max_cells
        Subsample to at most this many cells (None: all).

    Returns
    -------
    pd.DataFrame
        One row per (block, target): ``metric``, ``chance``, ``linear``, ``knn``, ``score`` (the
        better probe), ``above_chance`` (``score - chance``) and ``n_test``.
    """
    n = {z.shape[0] for z in latents.values()} | {len(t) for t in targets.values()}
    if len(n) != 1:
        raise ValueError(f"latents and targets must all have the same number of cells, got sizes {sorted(n)}.")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}.")
    n_cells = n.pop()
    rng = np.random.default_rng(seed)
    keep = np.arange(n_cells)
    if max_cells is not None and n_cells > max_cells:
        keep = np.sort(rng.choice(n_cells, size=max_cells, replace=False))
    rows = []
    for tname, t in targets.items():
        t = pd.Series(np.asarray(t, dtype=object)[keep])
        valid = ~t.isna().to_numpy()
        if tname in continuous:
            yv = t[valid].astype(float).to_numpy()
        else:
            yv = t[valid].astype(str).to_numpy()
        for zname, Z in latents.items():
            Zv = np.asarray(Z, dtype=np.float64)[keep][valid]
            probe = _probe_regression if tname in continuous else _probe_classification
            res = probe(Zv, yv, test_size, seed, n_neighbors)
            rows.append({"latent": zname, "target": tname, **res})
    df = pd.DataFrame(rows)
    df["score"] = df[["linear", "knn"]].max(axis=1)
    df["above_chance"] = df["score"] - df["chance"]
    return df[["latent", "target", "metric", "chance", "linear", "knn", "score", "above_chance", "n_test"]]


def evaluate_disentanglement(
    model,
    adata=None,
    *,
    batch_key: str | None = None,
    labels_key: str | None = None,
    continuous_keys: list[str] | tuple[str, ...] = (),
    indices=None,
    test_size: float = 0.3,
    seed: int = 0,
    max_cells: int | None = 20000,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Measure what ``z_b``, ``z_l`` and ``z_r`` of a trained :class:`cellvi.FADVI` reveal.

    Every block is probed for the batch, the label and each continuous key by fresh probes
    trained on part of the cells and scored on held-out cells (see :func:`probe_latents`).
    A well-disentangled model has the batch near chance in ``z_l`` and ``z_r``, the label near
    chance in ``z_b`` and ``z_r``, and unsupervised programs (continuous keys) in ``z_r`` only.

    Parameters
    ----------
    model
        A trained :class:`cellvi.FADVI`.
    adata
        Data to embed (defaults to the model's).
    batch_key
        Column of ``adata.obs`` with the batch; defaults to the model's registered ``batch_key``.
    labels_key
        Column with the labels (e.g. the true cell types); defaults to the registered
        ``labels_key``. Cells with the unlabeled category (or NaN) are left out of the label probes.
    continuous_keys
        Columns with continuous programs to probe for (e.g. a known cell-cycle score).
    indices
        Cells to use (default all).
    test_size, seed, max_cells
        See :func:`probe_latents`.
    batch_size
        Minibatch size for embedding.

    Returns
    -------
    pd.DataFrame
        One row per (latent, target), as :func:`probe_latents`.

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate_batches(n_cells=300, n_genes=100, seed=0)
    >>> cellvi.FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    >>> model = cellvi.FADVI(adata, n_latent_b=4, n_latent_l=4, n_latent_r=2)
    >>> model.train(max_epochs=2, enable_progress_bar=False)
    >>> table = cellvi.fadvi.evaluate_disentanglement(model, labels_key="cell_type", continuous_keys=["residual"])
    >>> sorted(table["latent"].unique())
    ['z_b', 'z_l', 'z_r']
    """
    adata = model.adata if adata is None else adata
    setup = model.registry_["setup_args"]
    batch_key = batch_key or setup.get("batch_key")
    labels_key = labels_key or setup.get("labels_key")
    unlabeled = setup.get("unlabeled_category")
    for arg, key in (("batch_key", batch_key), ("labels_key", labels_key), *(("continuous_keys", k) for k in continuous_keys)):
        if key is not None and key not in adata.obs.columns:
            raise ValueError(f"{arg}={key!r} is not a column of adata.obs.")
    sel = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
    latents = {
        f"z_{k}": model.get_latent_representation(adata, indices=indices, representation=k, batch_size=batch_size)
        for k in ("b", "l", "r")
    }
    obs = adata.obs.iloc[sel]
    targets = {}
    if batch_key is not None:
        targets["batch"] = obs[batch_key].astype(object).to_numpy()
    if labels_key is not None:
        lab = obs[labels_key].astype(object)
        targets["label"] = lab.where(lab.astype(str) != str(unlabeled), None).to_numpy()
    for key in continuous_keys:
        targets[key] = obs[key].to_numpy(dtype=float)
    return probe_latents(
        latents, targets, continuous=tuple(continuous_keys), test_size=test_size, seed=seed, max_cells=max_cells
    )
