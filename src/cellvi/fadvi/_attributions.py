"""Feature attributions (captum, optional extra ``cellvi[interpret]``) and feature ranking."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch


def require_captum():
    """Import captum or raise an ImportError that names the extra to install."""
    try:
        import captum.attr  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "predict(interpretability=...) needs captum, an optional dependency of cellvi: "
            "pip install 'cellvi[interpret]'"
        ) from err
    return captum.attr


def attribute(
    method: str,
    forward: Callable,
    x: torch.Tensor,
    target: torch.Tensor,
    extra: tuple,
    method_args: dict | None = None,
) -> torch.Tensor:
    """Attributions of ``forward(x, *extra)[:, target]`` to ``x`` (zero-count baseline), ``(n, n_genes)``.

    ``method`` is ``"ig"`` (Integrated Gradients; ``n_steps`` default 50) or ``"gs"``
    (GradientShap; ``n_samples`` default 20, ``stdevs`` default 0, reproducible through ``seed``,
    default 0, without touching the global random state).
    """
    attr = require_captum()
    args = dict(method_args or {})
    seed = int(args.pop("seed", 0))
    x = x.detach().float().clone()
    baseline = torch.zeros_like(x)
    extra = tuple(extra)
    target = target.reshape(-1).long()
    with torch.enable_grad():
        if method == "ig":
            args.setdefault("n_steps", 50)
            args.setdefault("internal_batch_size", max(1, x.shape[0]) * 10)
            out = attr.IntegratedGradients(forward).attribute(
                x, baselines=baseline, target=target, additional_forward_args=extra, **args
            )
        elif method == "gs":
            args.setdefault("n_samples", 20)
            args.setdefault("stdevs", 0.0)
            # captum draws GradientShap's baselines with torch and its path coefficients with
            # numpy's global generator: seed both, then put both states back
            np_state = np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                np.random.seed(seed)
                # a distribution of baselines: two zero-count cells (GradientShap draws among them)
                baselines = torch.zeros((2, x.shape[1]), dtype=x.dtype, device=x.device)
                try:
                    out = attr.GradientShap(forward).attribute(
                        x, baselines=baselines, target=target, additional_forward_args=extra, **args
                    )
                finally:
                    np.random.set_state(np_state)
        else:
            raise ValueError(f"interpretability must be 'ig' or 'gs', got {method!r}.")
    return out.detach()


def rank_features(
    attributions: np.ndarray,
    feature_names: Sequence[str],
    top_n: int | None = None,
    groups: Sequence | None = None,
) -> pd.DataFrame:
    """Rank features by mean absolute attribution, overall and (with ``groups``) within each group."""
    a = np.asarray(attributions, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"attributions must be a (n_cells, n_genes) matrix, got shape {a.shape}.")
    if a.shape[1] != len(feature_names):
        raise ValueError(
            f"attributions has {a.shape[1]} columns but adata has {len(feature_names)} genes; "
            "pass the adata the attributions were computed on."
        )
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1):
        raise ValueError(f"top_n must be None or an integer >= 1, got {top_n!r}.")
    names = np.asarray(feature_names, dtype=object)

    def table(block: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame(
            {
                "feature": names,
                "feature_idx": np.arange(a.shape[1]),
                "attribution_mean": block.mean(0),
                "attribution_std": block.std(0, ddof=1) if block.shape[0] > 1 else np.zeros(a.shape[1]),
                "attribution_abs_mean": np.abs(block).mean(0),
                "n_cells": np.full(a.shape[1], block.shape[0]),
            }
        )
        df = df.sort_values("attribution_abs_mean", ascending=False, kind="stable").reset_index(drop=True)
        return df.head(top_n) if top_n is not None else df

    if groups is None:
        return table(a)
    groups = np.asarray(groups)
    if groups.shape[0] != a.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} entries but attributions has {a.shape[0]} cells.")
    parts = [table(a).assign(group="all")]
    for g in pd.unique(groups):
        parts.append(table(a[groups == g]).assign(group=str(g)))
    out = pd.concat(parts, ignore_index=True)
    out["rank"] = out.groupby("group", sort=False).cumcount() + 1
    return out
