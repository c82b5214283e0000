"""Seeded spatial transcriptomics simulator with planted cell-cell interactions (ground truth for AMICI)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse as sp
from scipy.spatial import cKDTree

#: The default planted interactions: ``(sender, receiver, length_scale, sign)``.
DEFAULT_INTERACTIONS: tuple[tuple[str, str, float, int], ...] = (
    ("B", "A", 20.0, +1),
    ("C", "B", 12.0, -1),
)


def simulate_spatial(
    n_cells: int = 3000,
    n_genes: int = 100,
    *,
    interactions: Sequence[tuple[str, str, float, int]] | None = DEFAULT_INTERACTIONS,
    n_targets: int = 8,
    effect_size: float = 1.5,
    n_markers: int = 6,
    cell_spacing: float = 10.0,
    patch_size: float = 60.0,
    library_size: float = 2000.0,
    sparse: bool = False,
    seed: int = 0,
):
    """Simulate a spatial tissue with clustered cell types and planted sender -> receiver effects.

    Cells are scattered uniformly in a square (about one cell per ``cell_spacing**2`` area, so
    coordinates read as micrometres). The square is cut into Voronoi patches of about
    ``patch_size`` across, and each patch gets one of four cell types, ``"A"``, ``"B"``, ``"C"``
    and the decoy ``"D"``; types therefore meet along patch borders, which is where interactions
    happen. Each type has ``n_markers`` marker genes, so senders can be recognised from their
    expression.

    For every planted interaction ``(sender, receiver, length_scale, sign)`` a receiver cell whose
    nearest sender cell lies at distance ``d`` gets the strength
    ``w = 1 / (1 + exp((d - length_scale) / (0.1 * length_scale)))``: about 1 within
    ``length_scale``, about 0 beyond. The interaction's ``n_targets`` target genes (disjoint from
    the markers and from other interactions' targets) get their log-rate shifted by
    ``sign * effect_size * w``. The decoy type ``"D"`` has markers like the others but sends and
    receives no effect. ``interactions=None`` (or ``()``) plants no effect at all: a null data
    set for calibration.

    Counts are Poisson with a log-normal library size; ``X`` holds ``log1p`` of counts normalised
    to ``library_size`` per cell (what :class:`cellvi.AMICI` models) and ``layers["counts"]`` the
    counts.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes; at least ``4 * n_markers + n_targets * len(interactions)``.
    interactions
        Planted ``(sender, receiver, length_scale, sign)`` tuples over the types ``A``-``C``;
        ``sign`` is ``+1`` (up-regulation) or ``-1``. ``None`` or empty: no planted effect.
    n_targets
        Target genes per interaction.
    effect_size
        Shift of the log-rate of a target gene in a fully interacting receiver.
    n_markers
        Marker genes per cell type (log-rate +2 in that type).
    cell_spacing
        Typical distance between neighbouring cells (coordinate units).
    patch_size
        Typical width of a single-type patch (coordinate units).
    library_size
        Mean counts per cell, and the normalisation target of ``X``.
    sparse
        Store ``X`` and ``layers["counts"]`` as CSR matrices.
    seed
        Random seed; the same seed gives the same data.

    Returns
    -------
    :class:`~anndata.AnnData` with

    * ``X``: log-normalised expression (float32); ``layers["counts"]``: counts;
    * ``obsm["spatial"]``: (n_cells, 2) coordinates; ``obs["cell_type"]`` (categorical ``A``-``D``);
      ``obs["cell_radius"]``: a per-cell radius (for ``cell_radius_key``);
    * ``obs["interaction_strength"]``: total ``w`` a cell receives over all interactions;
      ``obs["interacting"]``: ``w > 0.5``; ``obs["dist_to_<S>"]``: distance to the nearest cell of
      type ``S``;
    * ``var["target_of"]``: ``"S->R"`` for target genes, ``""`` otherwise; ``var["effect_sign"]``:
      +1 / -1 / 0; ``var["marker_of"]``: the type a marker gene marks, ``""`` otherwise;
    * ``uns["interactions"]``: a table (DataFrame) with one row per interaction: ``sender``,
      ``receiver``, ``length_scale``, ``sign``, ``effect_size``, ``targets`` (comma-separated genes);
      ``uns["decoy"] = "D"``.

    Examples
    --------
    >>> from cellvi.data import simulate_spatial
    >>> adata = simulate_spatial(n_cells=500, n_genes=60, seed=1)
    >>> adata.obsm["spatial"].shape
    (500, 2)
    >>> sorted(adata.obs["cell_type"].cat.categories)
    ['A', 'B', 'C', 'D']
    >>> adata.uns["interactions"][["sender", "receiver"]].values.tolist()
    [['B', 'A'], ['C', 'B']]
    """
    import anndata as ad

    from cellvi._validation import check_positive_int

    n_cells = check_positive_int(n_cells, "n_cells", minimum=20)
    n_genes = check_positive_int(n_genes, "n_genes")
    n_targets = check_positive_int(n_targets, "n_targets")
    n_markers = check_positive_int(n_markers, "n_markers")
    for arg, val in (("cell_spacing", cell_spacing), ("patch_size", patch_size), ("library_size", library_size)):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{arg} must be a positive number, got {val!r}.")
    if not np.isfinite(effect_size) or effect_size < 0:
        raise ValueError(f"effect_size must be a number >= 0, got {effect_size!r}.")
    types = ["A", "B", "C", "D"]
    interactions = [] if interactions is None else [tuple(i) for i in interactions]
    for inter in interactions:
        if (
            len(inter) != 4
            or inter[0] not in types[:3]
            or inter[1] not in types[:3]
            or inter[0] == inter[1]
            or not inter[2] > 0
            or inter[3] not in (1, -1)
        ):
            raise ValueError(
                "interactions must hold (sender, receiver, length_scale, sign) tuples with sender != receiver "
                f"in {types[:3]}, length_scale > 0 and sign +1 or -1; got {inter!r}."
            )
    need = len(types) * n_markers + n_targets * len(interactions)
    if n_genes < need:
        raise ValueError(
            f"n_genes={n_genes} is too small: {len(types)} types x {n_markers} markers + "
            f"{len(interactions)} interactions x {n_targets} targets need at least {need} genes."
        )

    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n_cells) * cell_spacing)
    coords = rng.uniform(0.0, side, size=(n_cells, 2))

    # Voronoi patches; the first four patches take the four types so every type is present.
    n_patches = max(len(types), int(round((side / patch_size) ** 2)))
    centres = rng.uniform(0.0, side, size=(n_patches, 2))
    patch_type = np.concatenate([np.arange(len(types)), rng.integers(0, len(types), n_patches - len(types))])
    _, patch = cKDTree(centres).query(coords)
    type_code = patch_type[patch]

    # Baseline log-rates, type markers, interaction targets.
    log_rate = np.tile(rng.normal(0.0, 1.0, n_genes), (len(types), 1))
    genes = np.array([f"gene_{g}" for g in range(n_genes)])
    perm = rng.permutation(n_genes)
    marker_of = np.full(n_genes, "", dtype=object)
    for t, name in enumerate(types):
        idx = perm[t * n_markers : (t + 1) * n_markers]
        log_rate[t, idx] += 2.0
        marker_of[idx] = name
    target_of = np.full(n_genes, "", dtype=object)
    effect_sign = np.zeros(n_genes, dtype=np.int64)
    log_rate_cells = log_rate[type_code]

    dist_to = {}
    for t, name in enumerate(types):
        members = np.flatnonzero(type_code == t)
        d, _ = cKDTree(coords[members]).query(coords)
        dist_to[name] = d
        # a cell's own type: distance to the nearest *other* cell of that type is not needed
    strength = np.zeros(n_cells)
    rows = []
    start = len(types) * n_markers
    for i, (sender, receiver, scale, sign) in enumerate(interactions):
        tgt = perm[start + i * n_targets : start + (i + 1) * n_targets]
        target_of[tgt] = f"{sender}->{receiver}"
        effect_sign[tgt] = sign
        is_rec = type_code == types.index(receiver)
        w = 1.0 / (1.0 + np.exp((dist_to[sender] - scale) / (0.1 * scale)))
        w = np.where(is_rec, w, 0.0)
        strength += w
        log_rate_cells[:, tgt] += sign * effect_size * w[:, None]
        rows.append(
            {
                "sender": sender,
                "receiver": receiver,
                "length_scale": float(scale),
                "sign": int(sign),
                "effect_size": float(effect_size),
                "targets": ",".join(genes[np.sort(tgt)]),
            }
        )

    # Poisson counts with log-normal library sizes.
    rate = np.exp(log_rate_cells)
    rate /= rate.sum(axis=1, keepdims=True)
    lib = library_size * rng.lognormal(0.0, 0.3, n_cells)
    counts = rng.poisson(rate * lib[:, None]).astype(np.float32)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    X = np.log1p(counts / totals * library_size).astype(np.float32)
    if sparse:
        X = sp.csr_matrix(X)
        counts = sp.csr_matrix(counts)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(type_code, categories=types),
            "cell_radius": rng.uniform(0.3, 0.5, n_cells) * cell_spacing,
            "interaction_strength": strength,
            "interacting": strength > 0.5,
            **{f"dist_to_{name}": d for name, d in dist_to.items()},
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(
        {
            "target_of": pd.Series(target_of, dtype=str).values,
            "effect_sign": effect_sign,
            "marker_of": pd.Series(marker_of, dtype=str).values,
        },
        index=pd.Index(genes),
    )
    adata = ad.AnnData(X=X, obs=obs, var=var, layers={"counts": counts})
    adata.obsm["spatial"] = coords.astype(np.float32)
    adata.uns["interactions"] = pd.DataFrame(
        rows, columns=["sender", "receiver", "length_scale", "sign", "effect_size", "targets"]
    )
    adata.uns["decoy"] = "D"
    return adata
