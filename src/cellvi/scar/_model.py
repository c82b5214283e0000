"""User API of SCAR: ambient RNA removal (setup, training, denoised counts, accessors, assignment)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model.base import BaseModelClass, RNASeqMixin, UnsupervisedTrainingMixin, VAEMixin
from scvi.module.base._decorators import _move_data_to_device

from cellvi._base import RegistryMixin
from cellvi._validation import (
    check_counts,
    check_layer,
    check_no_empty_rows,
    check_obs_key,
    check_positive_int,
    get_matrix,
    layer_arg,
)
from cellvi.dataloaders import DataPathMixin, make_data_loader

from .._training import TrainRunner
from . import _assign, _profile
from ._fields import LogBinomialConstantField
from ._module import SCARModule
from ._removal import ambient_counts_to_remove, check_threshold
from ._training import SCARTrainingPlan

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


class SCAR(RegistryMixin, DataPathMixin, RNASeqMixin, VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Ambient RNA removal in scRNA-seq data :cite:p:`Sheng22`.

    Each cell is a mixture of native expression and ambient RNA,
    ``p_cg = (1 - rho_c) f_cg + rho_c a_g``, with a per-cell noise ratio ``rho_c``, sparse native
    frequencies ``f_c`` decoded from a latent ``z`` and a fixed ambient profile ``a`` (one per batch).
    Original implementation: Novartis/scar; API of ``scvi.external.SCAR``.

    Parameters
    ----------
    adata
        AnnData object that has been registered via :meth:`~cellvi.SCAR.setup_anndata`.
    ambient_profile
        The probability of occurrence of each ambient transcript. A key of ``adata.varm``, an array
        or DataFrame of shape ``(n_genes,)``, ``(n_genes, 1)`` or ``(n_genes, n_batches)`` (one column
        per category of the registered batch, in category order), or a tensor. If None, the profile
        written by :meth:`get_ambient_profile` (``adata.varm["ambient_profile"]``) is used when
        present; otherwise averaging cells to estimate the ambient profile (with a warning: the
        contamination is then only weakly identifiable), by default None.
    n_hidden
        Number of nodes per hidden layer.
    n_latent
        Dimensionality of the latent space.
    n_layers
        Number of hidden layers used for encoder and decoder NNs.
    dropout_rate
        Dropout rate for neural networks.
    gene_likelihood
        One of:

        * ``'b'`` - Binomial distribution (total count: the exact observed library size)
        * ``'nb'`` - Negative binomial distribution
        * ``'zinb'`` - Zero-inflated negative binomial distribution
        * ``'poisson'`` - Poisson distribution
    latent_distribution
        One of:

        * ``'normal'`` - Normal distribution
        * ``'ln'`` - Logistic normal distribution (Normal(0, I) transformed by softmax)
    scale_activation
        Activation layer to use for px_scale_decoder
    sparsity
        The sparsity of expected native signals. It varies between datasets, e.g., if one prefilters
        genes -- using only highly variable genes -- the sparsity should be low; on the other hand, it
        should be set high in the case of unfiltered genes. Use 1 for guide, hashtag or CMO counts.
    **model_kwargs
        Keyword args for :class:`~cellvi.scar._module.SCARModule` (``log_variational``,
        ``use_batch_norm``, ``use_layer_norm``, ``noise_ratio_init``: the noise ratio of the
        untrained model, 0.1 by default where the original starts at 1/2, see
        :class:`~cellvi.scar._module.SCARModule`).

    Examples
    --------
    >>> import cellvi
    >>> adata, raw_adata = cellvi.data.simulate_ambient(n_cells=200, n_genes=100, n_empty=2000, seed=0)
    >>> cellvi.SCAR.setup_anndata(adata)
    >>> profile = cellvi.SCAR.get_ambient_profile(adata=adata, raw_adata=raw_adata)
    >>> vae = cellvi.SCAR(adata)
    >>> vae.train(max_epochs=2, enable_progress_bar=False)
    >>> adata.obsm["X_scAR"] = vae.get_latent_representation()
    >>> adata.layers["denoised"] = vae.get_denoised_counts()
    >>> adata.obs["contamination_est"] = vae.get_contamination_fraction()
    """

    _module_cls = SCARModule
    _training_plan_cls = SCARTrainingPlan
    _train_runner_cls = TrainRunner
    _data_loader_cls = staticmethod(make_data_loader)

    def __init__(
        self,
        adata: AnnData,
        ambient_profile: str | np.ndarray | pd.DataFrame | torch.Tensor | None = None,
        n_hidden: int = 150,
        n_latent: int = 15,
        n_layers: int = 2,
        dropout_rate: float = 0.0,
        gene_likelihood: Literal["zinb", "nb", "b", "poisson"] = "b",
        latent_distribution: Literal["normal", "ln"] = "normal",
        scale_activation: Literal["softmax", "softplus", "softplus_sp"] = "softplus_sp",
        sparsity: float = 0.9,
        **model_kwargs,
    ):
        super().__init__(adata)
        check_positive_int(n_hidden, "n_hidden")
        check_positive_int(n_latent, "n_latent")
        check_positive_int(n_layers, "n_layers")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}.")
        n_batch = self.summary_stats.n_batch
        profile = self._resolve_ambient_profile(adata, ambient_profile, n_batch)
        use_size_factor_key = REGISTRY_KEYS.SIZE_FACTOR_KEY in self.adata_manager.data_registry
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            ambient_profile=profile,
            n_batch=n_batch,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            scale_activation=scale_activation,
            sparsity=sparsity,
            use_size_factor_key=use_size_factor_key,
            **model_kwargs,
        )
        self._model_summary_string = (
            f"cellvi SCAR: n_hidden: {n_hidden}, n_latent: {n_latent}, n_layers: {n_layers}, "
            f"dropout_rate: {dropout_rate}, gene_likelihood: {gene_likelihood}, "
            f"latent_distribution: {latent_distribution}, sparsity: {sparsity}, n_batch: {n_batch}"
        )
        self.init_params_ = self._get_init_params(locals())

    # -- setup -----------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        batch_key: str | None = None,
        labels_key: str | None = None,
        layer: str | None = None,
        size_factor_key: str | None = None,
        **kwargs,
    ):
        """Sets up the :class:`~anndata.AnnData` object for this model.

        A mapping will be created between data fields used by this model to their respective
        locations in adata. None of the data in adata are modified. Only adds fields to adata.
        The counts are checked first (chunked, sparse stays sparse): they must be finite,
        non-negative integers and every cell must have at least one count. The Binomial's data-only
        constant ``sum_g log C(n_c, x_cg)`` of each cell is computed once (on the non-zeros) and
        written to ``adata.obs['_scar_log_binom']``, so training does not evaluate it per gene.

        Parameters
        ----------
        adata
            AnnData object. Rows represent cells, columns represent features.
        batch_key
            key in ``adata.obs`` for batch information. Categories will automatically be converted into
            integer categories and saved to ``adata.obs['_scvi_batch']``. If ``None``, assigns the same
            batch to all the data. With more than one batch, SCAR uses one ambient profile per batch
            and conditions its encoder and decoder on the batch.
        labels_key
            key in ``adata.obs`` for label information. Categories will automatically be converted into
            integer categories and saved to ``adata.obs['_scvi_labels']``. If ``None``, assigns the same
            label to all the data.
        layer
            if not ``None``, uses this as the key in ``adata.layers`` for raw count data.
        size_factor_key
            key in ``adata.obs`` for size factor information. Instead of using library size as a size
            factor, the provided size factor column will be used as offset in the mean of the
            likelihood. Assumed to be on linear scale. (The Binomial always uses the observed total.)
        """
        # first, while locals() holds only the arguments (else the count matrix is saved with the model)
        setup_method_args = cls._get_setup_method_args(**locals())
        check_layer(adata, layer)
        check_obs_key(adata, batch_key, "batch_key")
        check_obs_key(adata, labels_key, "labels_key")
        check_obs_key(adata, size_factor_key, "size_factor_key")
        X = get_matrix(adata, layer)
        check_counts(X, layer_arg(layer))
        check_no_empty_rows(X, layer_arg(layer), adata.obs_names)
        if size_factor_key is not None:
            sf = np.asarray(adata.obs[size_factor_key], dtype=np.float64)
            if not np.all(np.isfinite(sf)) or np.any(sf <= 0):
                raise ValueError(f"size_factor_key={size_factor_key!r}: size factors must be finite and > 0.")
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
            LogBinomialConstantField(layer),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _resolve_ambient_profile(self, adata, ambient_profile, n_batch: int) -> np.ndarray:
        """The ambient profile as an array ``(n_batch, n_genes)`` with rows summing to 1."""
        n_genes = self.summary_stats.n_vars
        arg = "ambient_profile"
        if ambient_profile is None and "ambient_profile" in adata.varm:
            ambient_profile, arg = "ambient_profile", "adata.varm['ambient_profile']"
        if ambient_profile is None:
            warnings.warn(
                "No ambient profile given and none in adata.varm['ambient_profile']: using the mean of the "
                "cells, which makes the contamination only weakly identifiable. Estimate it from the empty "
                "droplets with SCAR.get_ambient_profile(adata, raw_adata) first.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
            X = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            prof = np.asarray(X.sum(axis=0), dtype=np.float64).reshape(-1, 1)
        elif isinstance(ambient_profile, str):
            if ambient_profile not in adata.varm:
                raise ValueError(f"ambient_profile={ambient_profile!r} is not a key of adata.varm.")
            arg = f"adata.varm[{ambient_profile!r}]"
            prof = np.asarray(adata.varm[ambient_profile], dtype=np.float64)
        elif isinstance(ambient_profile, pd.DataFrame | pd.Series):
            prof = ambient_profile.to_numpy(dtype=np.float64)
        elif torch.is_tensor(ambient_profile):
            prof = ambient_profile.detach().cpu().double().numpy()
        elif isinstance(ambient_profile, np.ndarray | list | tuple):
            prof = np.asarray(ambient_profile, dtype=np.float64)
        else:
            raise ValueError(
                f"ambient_profile must be None, a varm key, an array, a DataFrame or a tensor, got "
                f"{type(ambient_profile).__name__}."
            )
        if prof.ndim == 1:
            prof = prof[:, None]
        if prof.ndim != 2:
            raise ValueError(f"{arg} must be 1-D or 2-D, got shape {prof.shape}.")
        if prof.shape[0] != n_genes and prof.shape[1] == n_genes:
            prof = prof.T  # (batches, genes) given
        if prof.shape[0] != n_genes:
            raise ValueError(
                f"{arg} has shape {prof.shape}; expected {n_genes} genes (one row per gene of adata)."
            )
        if prof.shape[1] not in (1, n_batch):
            raise ValueError(f"{arg} has {prof.shape[1]} columns; expected 1 or one per batch ({n_batch}).")
        if not np.all(np.isfinite(prof)):
            raise ValueError(f"{arg} contains NaN or infinite values.")
        if np.any(prof < 0):
            raise ValueError(f"{arg} contains negative values; expected probabilities >= 0.")
        sums = prof.sum(0)
        if np.any(sums <= 0):
            raise ValueError(f"{arg} does not sum to a positive value (column sums {sums.tolist()}).")
        prof = prof / sums
        if prof.shape[1] == 1:
            prof = np.repeat(prof, n_batch, axis=1)
        return prof.T.astype(np.float32)

    # -- ambient profile -------------------------------------------------------------------------
    @staticmethod
    def get_ambient_profile(
        adata: AnnData,
        raw_adata: AnnData,
        prob: float = 0.995,
        min_raw_counts: int = 2,
        iterations: int = 3,
        n_batch: int = 1,
        sample: int = 50000,
        *,
        batch_key: str | None = None,
        seed: int | None = 0,
        layer: str | None = None,
    ) -> pd.DataFrame:
        """Calculate ambient profile for relevant features.

        Identify the cell-free droplets through a multinomial distribution. See EmptyDrops
        :cite:p:`Lun2019` for details. A droplet outside ``adata`` is cell-free when its counts are
        a plausible multinomial draw from the current profile *at its own depth*: its log-likelihood
        is compared with a Monte Carlo null of droplets of the same depth drawn from the profile
        (so the test does not depend on the number of genes, unlike a fixed ``G * log(prob)``
        threshold). The profile is re-estimated from the cell-free droplets ``iterations`` times.
        Cells of ``adata`` are never used or relabelled. The raw matrix is read in sparse chunks
        and never densified.

        Parameters
        ----------
        adata
            A filtered adata object, loaded from filtered_feature_bc_matrix using ``scanpy.read``, gene
            filtering is recommended to save memory.
        raw_adata
            A raw adata object, loaded from raw_feature_bc_matrix using :func:`~scanpy.read`.
            It must hold every gene of ``adata``.
        prob
            The probability of each gene, considered as containing ambient RNA if greater than prob
            (joint prob equals to the product of all genes for a droplet), by default 0.995. In
            cellvi it is the confidence of the depth-aware test: a droplet is cell-free unless its
            likelihood under the profile is below the ``1 - prob`` quantile of ambient-only droplets
            of the same depth.
        min_raw_counts
            Total counts filter for raw_adata, filtering out low counts to save memory, by default 2.
        iterations
            Total iterations, by default 3. With 0, the profile is the mean of the droplets' own
            profiles, without any test.
        n_batch
            Total number of batches, set it to a bigger number when the out-of-memory issue occurs,
            by default 1. (The droplets are read in this many sparse chunks; nothing is densified.)
        sample
            Randomly sample droplets to test, if greater than total droplets, use all droplets, by
            default 50000.
        batch_key
            Column of ``adata.obs`` and ``raw_adata.obs`` with the batch (channel) of each droplet: one
            profile per batch. If None and ``adata`` was set up with :meth:`setup_anndata` with a
            ``batch_key``, that key is used.
        seed
            Seed of the droplet sampling and of the Monte Carlo null (``None``: not seeded).
        layer
            Layer of ``raw_adata`` with the counts (default ``raw_adata.X``).

        Returns
        -------
        The relevant ambient profile is added in ``adata.varm["ambient_profile"]`` (genes x batches, each
        column sums to 1) and returned as a DataFrame (index ``var_names``, one column per batch); its
        ``attrs["n_cell_free"]`` holds the number of droplets each profile comes from.
        """
        if batch_key is None:
            manager = SCAR._get_most_recent_anndata_manager(adata)
            if manager is not None:
                batch_key = manager.registry["setup_args"].get("batch_key")
        return _profile.get_ambient_profile(
            adata,
            raw_adata,
            prob=prob,
            min_raw_counts=min_raw_counts,
            iterations=iterations,
            n_batch=n_batch,
            sample=sample,
            batch_key=batch_key,
            seed=seed,
            layer=layer,
        )

    # -- training --------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        self.module.training_contamination.fill_(self._contamination_of(self.adata))
        return out

    train.__doc__ = UnsupervisedTrainingMixin.train.__doc__

    def _contamination_of(self, adata: AnnData | None) -> float:
        """Fraction of the counts of ``adata`` that the model calls ambient: ``sum_c rho_c n_c / sum_c n_c``."""
        num = den = 0.0
        for tensors, px in self._decode(adata, None, None, give_mean=True):
            n = tensors[REGISTRY_KEYS.X_KEY].sum(-1, dtype=torch.float64)
            num += float((px.noise_ratio[..., 0].double() * n).sum())
            den += float(n.sum())
        return num / den if den > 0 else 0.0

    def _removal_threshold(self, threshold) -> float:
        threshold = check_threshold(threshold)
        if threshold != "balanced":
            return threshold
        value = float(self.module.training_contamination)
        if np.isnan(value):  # a model saved before this was recorded: compute it once
            value = self._contamination_of(self.adata)
            self.module.training_contamination.fill_(value)
        return min(max(value, 1e-6), 1 - 1e-6)

    # -- decoding helper -------------------------------------------------------------------------
    def _decode(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        batch_size: int | None,
        n_samples: int = 1,
        give_mean: bool = False,
        transform_batch: int | None = None,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
    ) -> Iterator[tuple[dict, object]]:
        """Yield ``(tensors, px)`` per minibatch under inference mode.

        ``px`` has a leading sample dimension when ``n_samples > 1``; with ``give_mean`` (and
        ``n_samples == 1``) the posterior mean of ``z`` is decoded, so results are deterministic.
        A given ``dataloader`` is iterated instead of one made from ``adata`` (which is then ignored).
        """
        check_positive_int(n_samples, "n_samples")
        if dataloader is not None:
            scdl = dataloader
        else:
            adata = self._validate_anndata(adata)
            scdl = self._make_data_loader(
                adata=adata, indices=indices, batch_size=batch_size, **(data_loader_kwargs or {})
            )
        module = self.module
        module.eval()
        with torch.inference_mode():
            for tensors in scdl:
                tensors = _move_data_to_device(tensors, self.device)
                inf = module.inference(**module._get_inference_input(tensors), n_samples=n_samples)
                if give_mean and n_samples == 1:
                    inf["z"] = module.z_encoder.z_transformation(inf["qz"].loc)
                gen = module.generative(
                    **module._get_generative_input(tensors, inf), transform_batch=transform_batch
                )
                yield tensors, gen["px"]

    def _cell_index(self, adata, indices) -> pd.Index:
        adata = self._validate_anndata(adata)
        return adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]

    # -- SCAR outputs ----------------------------------------------------------------------------
    def get_denoised_counts(
        self,
        adata: AnnData | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        *,
        indices: Sequence[int] | None = None,
        method: Literal["posterior", "resynthesis"] = "posterior",
        threshold: float | Literal["balanced"] = "balanced",
        clip_to_obs: bool = True,
    ) -> sparse.csr_matrix:
        r"""Generate observation samples from the posterior predictive distribution.

        The posterior predictive distribution is written as :math:`p(\hat{x} \mid x)`; here it is the
        native part of the counts. With ``method="posterior"`` (default) the ambient counts are removed
        from the observed ones: each of the ``x_cg`` counts is ambient with probability
        ``q_cg = rho_c a_g / p_cg``, so the number ``A`` of ambient counts among them is
        ``Binomial(x_cg, q_cg)`` (exact under the Binomial and Poisson mixtures, an approximation under
        NB/ZINB), and the denoised count is ``x_cg - r`` with ``r`` the largest number such that
        ``P(A >= r | x_cg) >= threshold``. It never exceeds the observed count and needs no random
        rounding. With ``method="resynthesis"`` (the original scAR) the counts are the stochastic
        rounding of ``N_c (1 - rho_c) f_c``; they can exceed the observed counts unless ``clip_to_obs``.

        ``threshold`` trades ambient counts left in against native counts removed: removing one more
        count of an entry is worth it when the chance that it is ambient is at least ``threshold``.
        ``0.5`` gives the posterior median (fewest counts wrong, closest to the native counts);
        ``"balanced"`` (default) uses the fraction of the training counts the model calls ambient,
        which weighs the fraction of ambient counts left in and the fraction of native counts removed
        equally (the threshold that maximises their difference, Youden's index). On the data of
        ``benchmarks/scar.py`` (``simulate_ambient``, 2000 cells x 2000 genes, 15% contamination, 100
        epochs; ``--seed 0`` and ``--seed 1``) ``"balanced"`` (thresholds 0.184 and 0.203) removed
        88-89% of the ambient counts and 17% of the native ones (RMSE to the native counts 0.51,
        per-cell log1p correlation 0.95); ``0.5`` removed 68-72% and 6% (RMSE 0.39-0.40, correlation
        0.96). The rounded posterior mean used before removed 72% and 9% (RMSE 0.43, seed 0);
        ``scvi.external.SCAR`` removes 80% and 32-33% (RMSE 1.61-1.71).

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If None, defaults to the
            AnnData object used to initialize the model.
        n_samples
            Number of samples for each cell; with more than one, the median over the samples.
        batch_size
            Minibatch size for data loading into the model. Defaults to ``scvi.settings.batch_size``.
        indices
            Indices of cells in adata to use. If None, all cells are used.
        method
            ``"posterior"`` (remove ambient counts from the observed ones) or ``"resynthesis"``.
        threshold
            ``"balanced"`` or a number in (0, 1): remove a count when the posterior probability that
            it is ambient is at least this (only ``"posterior"``); lower removes more.
        clip_to_obs
            Clip the denoised counts to the observed counts (only changes ``"resynthesis"``; the
            posterior never exceeds them). Clipping re-synthesised counts inflates the removal.

        Returns
        -------
        Sparse integer matrix (CSR, int32) with shape (n_cells, n_genes).
        """
        if method not in ("posterior", "resynthesis"):
            raise ValueError(f"method must be 'posterior' or 'resynthesis', got {method!r}.")
        tau = self._removal_threshold(threshold)
        parts = []  # (values, column indices, non-zeros per row) of each minibatch: one CSR at the end
        for tensors, px in self._decode(adata, indices, batch_size, n_samples=n_samples):
            x = tensors[REGISTRY_KEYS.X_KEY]
            if method == "posterior":  # only the observed non-zeros can lose counts
                flat_np = np.flatnonzero(x.cpu().numpy())
                flat = torch.from_numpy(flat_np).to(x.device)
                amb = px.noise_ratio * px.ambient  # q = rho a / ((1 - rho) f + rho a)
                q = amb.div_(torch.addcmul(amb, 1 - px.noise_ratio, px.scale).clamp_min_(1e-12))
                q = q.reshape(*q.shape[:-2], -1).index_select(-1, flat)
                x_nz = x.reshape(-1).index_select(0, flat)
                kept = x_nz - ambient_counts_to_remove(x_nz.expand_as(q), q, tau)
                if n_samples > 1:
                    kept = kept.median(0).values
                parts.append(_nonzeros_at(kept.cpu().numpy(), flat_np, x.shape))
                continue
            mean = x.sum(-1, keepdim=True) * (1 - px.noise_ratio) * px.scale
            base = torch.floor(mean)
            counts = base + torch.bernoulli(mean - base)  # stochastic rounding
            if clip_to_obs:
                counts = torch.minimum(counts, x)
            if n_samples > 1:
                counts = counts.median(0).values
            parts.append(_nonzeros(counts.cpu().numpy()))
        return _csr_from_parts(parts, self.summary_stats.n_vars)

    def get_contamination_fraction(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> pd.Series:
        """Per-cell contamination fraction (noise ratio) ``rho_c``: the fraction of counts that are ambient.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If None, the model's.
        indices
            Indices of cells in adata to use. If None, all cells are used.
        n_samples
            Number of posterior samples of ``z``; the result is their mean.
        give_mean
            With ``n_samples == 1``, decode the posterior mean of ``z`` (deterministic) instead of a sample.
        batch_size
            Minibatch size for data loading into model. Defaults to ``scvi.settings.batch_size``.

        Returns
        -------
        Series named ``"contamination"`` indexed by ``obs_names`` (float64).
        """
        vals = []
        for _, px in self._decode(adata, indices, batch_size, n_samples=n_samples, give_mean=give_mean):
            rho = px.noise_ratio[..., 0]
            vals.append((rho.mean(0) if n_samples > 1 else rho).cpu().numpy())
        return pd.Series(
            np.concatenate(vals).astype(np.float64),
            index=self._cell_index(adata, indices),
            name="contamination",
        )

    def get_native_frequencies(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = True,
        batch_size: int | None = None,
        gene_list: Sequence[str] | None = None,
        return_numpy: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Native frequencies ``f_c``: the cell's expression without ambient RNA, summing to 1 over genes.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If None, the model's.
        indices
            Indices of cells in adata to use. If None, all cells are used.
        n_samples
            Number of posterior samples of ``z``; the result is their mean.
        give_mean
            With ``n_samples == 1``, decode the posterior mean of ``z`` (deterministic) instead of a sample.
        batch_size
            Minibatch size for data loading into model. Defaults to ``scvi.settings.batch_size``.
        gene_list
            Return frequencies for a subset of genes only.
        return_numpy
            Return a numpy array instead of a DataFrame (cells x genes).
        """
        adata_v = self._validate_anndata(adata)
        mask = slice(None) if gene_list is None else np.asarray(adata_v.var_names.isin(gene_list))
        vals = []
        for _, px in self._decode(adata, indices, batch_size, n_samples=n_samples, give_mean=give_mean):
            f = px.scale.mean(0) if n_samples > 1 else px.scale
            vals.append(f[..., mask].cpu().numpy())
        out = np.concatenate(vals).astype(np.float32)
        if return_numpy:
            return out
        return pd.DataFrame(out, index=self._cell_index(adata, indices), columns=adata_v.var_names[mask])

    def assign_features(
        self,
        adata: AnnData | None = None,
        cutoff: float = 3.0,
        adjust: Literal["micro", "global", "none"] = "micro",
        batch_size: int | None = None,
        return_bayes_factors: bool = False,
    ) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
        r"""Assign guides, hashtags or CMOs to cells: a Bayes-factor test of counts against the ambient.

        For each cell the expected ambient counts are ``lambda_cg = N_c rho_c a_g``. ``adjust="micro"``
        adds the cell's remaining counts spread evenly over the features,
        ``(N_c - sum_g lambda_cg) / G``; ``"global"`` adds the mean of that over cells; ``"none"``
        nothing. The Bayes factor of feature ``g`` is
        ``BF_cg = P(X <= x_cg) / P(X = x_cg)`` for ``X ~ Poisson(lambda_cg + adjust)``, computed in
        log space (:math:`\log BF` clipped to 709.78, as in scAR). The features whose Bayes factor
        reaches ``cutoff`` and equals the cell's maximum are assigned (ties give several; none gives
        an empty assignment).

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If None, the model's.
        cutoff
            Minimum Bayes factor to assign a feature, by default 3.
        adjust
            ``"micro"``, ``"global"`` or ``"none"`` (see above).
        batch_size
            Minibatch size for data loading into model. Defaults to ``scvi.settings.batch_size``.
        return_bayes_factors
            Also return the log Bayes factors (cells x features).

        Returns
        -------
        DataFrame indexed by ``obs_names`` with ``feature`` (assigned feature names joined by ``"+"``,
        ``""`` for none), ``n_features`` (int) and ``log_bayes_factor`` (of the best feature); and, if
        ``return_bayes_factors``, the log Bayes factors.
        """
        if adjust not in ("micro", "global", "none"):
            raise ValueError(f"adjust must be 'micro', 'global' or 'none', got {adjust!r}.")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be > 0, got {cutoff!r}.")
        adata_v = self._validate_anndata(adata)
        xs, lams = [], []
        for tensors, px in self._decode(adata, None, batch_size, give_mean=True):
            xs.append(tensors[REGISTRY_KEYS.X_KEY].cpu().numpy())
            lams.append(px.ambient_mean.cpu().numpy())
        x, lam = np.concatenate(xs), np.concatenate(lams)
        log_bf = _assign.log_bayes_factors(x, lam, adjust)
        result = _assign.assign(log_bf, np.log(cutoff), adata_v.var_names, adata_v.obs_names)
        if return_bayes_factors:
            return result, pd.DataFrame(log_bf, index=adata_v.obs_names, columns=adata_v.var_names)
        return result

    # -- inherited methods made right for the mixture --------------------------------------------
    @torch.inference_mode()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int | None = 1,
        give_mean: bool | None = False,
        batch_size: int | None = None,
        dataloader=None,
        **data_loader_kwargs,
    ) -> dict[str, np.ndarray]:
        r"""Estimates for the parameters of the likelihood :math:`p(x \mid z)`.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If `None`, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If `None`, all cells are used.
        n_samples
            Number of posterior samples to use for estimation.
        give_mean
            Return expected value of parameters or a samples
        batch_size
            Minibatch size for data loading into model. Defaults to `scvi.settings.batch_size`.
        dataloader
            An iterator over minibatches of data on which to compute the metric (``adata``,
            ``indices`` and ``batch_size`` are then ignored).
        **data_loader_kwargs
            Keyword args for data loader.

        Returns
        -------
        ``mean`` (the mixture mean ``N_c p_cg``), ``probs`` (the mixture probabilities ``p_cg``),
        ``native_frequencies`` (``f_cg``), ``noise_ratio`` (``rho_c``), and ``dispersions`` for NB/ZINB
        and ``dropout`` for ZINB. Arrays are (cells, genes) or, with ``n_samples > 1`` and not
        ``give_mean``, (samples, cells, genes).
        """
        n_samples = n_samples or 1
        out: dict[str, list] = {}
        for _, px in self._decode(
            adata,
            indices,
            batch_size,
            n_samples=n_samples,
            dataloader=dataloader,
            data_loader_kwargs=data_loader_kwargs,
        ):
            parts = {
                "mean": px.mu,
                "probs": px.probs,
                "native_frequencies": px.scale,
                "noise_ratio": px.noise_ratio[..., 0],
            }
            if self.module.gene_likelihood in ("nb", "zinb"):
                parts["dispersions"] = px.theta
            if self.module.gene_likelihood == "zinb":
                parts["dropout"] = px.zi_probs
            for k, v in parts.items():
                out.setdefault(k, []).append(v.cpu().numpy())
        axis = 1 if n_samples > 1 else 0
        res = {k: np.concatenate(v, axis=axis) for k, v in out.items()}
        if give_mean and n_samples > 1:
            res = {k: v.mean(0) for k, v in res.items()}
        return res

    @torch.inference_mode()
    def _get_denoised_samples(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 25,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch: int | None = None,
        dataloader=None,
        **data_loader_kwargs,
    ) -> np.ndarray:
        """Native expression samples at ``rna_size_factor`` counts (for feature correlation).

        NB/ZINB: Gamma draws with the learned dispersion around ``rna_size_factor * f``; Binomial and
        Poisson (no dispersion): the native frequencies of each posterior sample of ``z``.
        Shape (cells, genes) or (cells, genes, samples).
        """
        out = []
        for _, px in self._decode(
            adata,
            indices,
            batch_size,
            n_samples=n_samples,
            transform_batch=transform_batch,
            dataloader=dataloader,
            data_loader_kwargs=data_loader_kwargs,
        ):
            rate = rna_size_factor * px.scale
            if self.module.gene_likelihood in ("nb", "zinb"):
                theta = px.theta
                rate = torch.distributions.Gamma(
                    theta, theta / rate.clamp_min(1e-8), validate_args=False
                ).sample()
            rate = rate.cpu().numpy()
            out.append(np.transpose(rate, (1, 2, 0)) if n_samples > 1 else rate)
        return np.concatenate(out, axis=0)

    @torch.inference_mode()
    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        dataloader=None,
        **data_loader_kwargs,
    ) -> np.ndarray:
        r"""Returns the latent library size for each cell.

        This is denoted as :math:`\ell_n` in the scVI paper. SCAR observes the library, so this is
        the observed total count of each cell (the same with ``give_mean`` True or False).

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If `None`, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If `None`, all cells are used.
        give_mean
            Return the mean or a sample from the posterior distribution.
        batch_size
            Minibatch size for data loading into model. Defaults to `scvi.settings.batch_size`.
        dataloader
            An iterator over minibatches of data on which to compute the metric (``adata``,
            ``indices`` and ``batch_size`` are then ignored).
        **data_loader_kwargs
            Keyword args for data loader.

        Returns
        -------
        Array (cells, 1).
        """
        if dataloader is None:
            adata = self._validate_anndata(adata)
            dataloader = self._make_data_loader(
                adata=adata, indices=indices, batch_size=batch_size, **data_loader_kwargs
            )
        scdl = dataloader
        return np.concatenate(
            [t[REGISTRY_KEYS.X_KEY].sum(-1, keepdim=True).cpu().numpy() for t in scdl]
        ).astype(np.float32)

    @torch.inference_mode()
    def get_aggregated_posterior(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dof: float | None = 3.0,
    ) -> torch.distributions.Distribution:
        """Compute the aggregated posterior over the ``u`` latent representations.

        Parameters
        ----------
        adata
            AnnData object to use. Defaults to the AnnData object used to initialize the model.
        indices
            Indices of cells to use.
        batch_size
            Batch size to use for computing the latent representation.
        dof
            Degrees of freedom for the Student's t-distribution components.
            If ``None``, components are Normal.

        Returns
        -------
        A mixture distribution of the aggregated posterior (components use the posterior standard
        deviation as scale).
        """
        import torch.distributions as dist

        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        if indices is None or len(indices) == 0:
            indices = np.arange(adata.n_obs)
        loc, var = self.get_latent_representation(
            adata=adata, indices=indices, batch_size=batch_size, return_dist=True
        )
        loc = torch.tensor(loc, device=self.device)
        scale = torch.tensor(np.sqrt(var), device=self.device)
        comp = dist.Normal(loc, scale) if dof is None else dist.StudentT(dof, loc, scale)
        return dist.MixtureSameFamily(
            dist.Categorical(logits=torch.ones(loc.shape[0], device=self.device)), dist.Independent(comp, 1)
        )

    # -- base-class methods that fail as inherited from scvi-tools 1.4 -----------------------------
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | float | str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform", "importance"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
        **importance_weighting_kwargs,
    ) -> np.ndarray | pd.DataFrame:
        r"""Returns the normalized (decoded) gene expression: the native frequencies ``f_c``.

        This is denoted as :math:`\rho_n` in the scVI paper. For SCAR it is the cell's expression
        without ambient RNA; each row sums to ``library_size`` (to 1 by default), not to ``1 - rho_c``.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If `None`, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If `None`, all cells are used.
        transform_batch
            Batch to condition on. If transform_batch is: - None, then real observed batch is used.
            - int, then batch transform_batch is used. - Otherwise based on string.
        gene_list
            Return frequencies of expression for a subset of genes.
        library_size
            Scale the expression frequencies to a common library size. If set to `"latent"`, use the
            latent library size (for SCAR the observed library, or the registered size factor).
        n_samples
            Number of posterior samples to use for estimation.
        n_samples_overall
            Number of posterior samples to use for estimation. Overrides `n_samples`.
        weights
            Weights to use for sampling. If `None`, defaults to `"uniform"`.
        batch_size
            Minibatch size for data loading into model. Defaults to `scvi.settings.batch_size`.
        return_mean
            Whether to return the mean of the samples.
        return_numpy
            Return a :class:`~numpy.ndarray` instead of a :class:`~pandas.DataFrame`. With
            ``n_samples_overall`` the result is an array unless ``return_numpy=False`` (then a
            DataFrame with the genes as columns and one row per sample).
        silent
            If True, disables the progress bar.
        dataloader
            An iterator over minibatches of data on which to compute the metric.
        data_loader_kwargs
            Keyword args for data loader, in dict form.
        **importance_weighting_kwargs
            Keyword arguments passed into :meth:`get_importance_weights`.

        Returns
        -------
        With ``n_samples > 1`` and not ``return_mean``: an array (n_samples, n_cells, n_genes).
        Otherwise (n_cells, n_genes), a DataFrame indexed by ``obs_names`` unless ``return_numpy``.
        With ``n_samples_overall``: (n_samples_overall, n_genes) sampled over the cells.
        """
        overall = n_samples_overall is not None
        out = super().get_normalized_expression(
            adata=adata,
            indices=indices,
            transform_batch=transform_batch,
            gene_list=gene_list,
            library_size=library_size,
            n_samples=n_samples,
            n_samples_overall=n_samples_overall,
            weights=weights,
            batch_size=batch_size,
            return_mean=return_mean,
            # scvi-tools labels the (n_samples_overall, G) samples with the cells' names and fails
            return_numpy=True if overall else return_numpy,
            silent=silent,
            dataloader=dataloader,
            data_loader_kwargs=data_loader_kwargs,
            **importance_weighting_kwargs,
        )
        if overall and return_numpy is False:
            adata_v = self._validate_anndata(adata)
            genes = (
                adata_v.var_names
                if gene_list is None
                else adata_v.var_names[adata_v.var_names.isin(gene_list)]
            )
            return pd.DataFrame(out, columns=genes)
        return out

    def get_importance_weights(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        qz: torch.distributions.Distribution,
        px: torch.distributions.Distribution,
        zs: torch.Tensor,
        max_cells: int = 1024,
        truncation: bool = False,
        n_mc_samples: int = 500,
        n_mc_samples_per_pass: int = 250,
        **data_loader_kwargs,
    ) -> np.ndarray:
        """Computes importance weights for the given samples.

        As :meth:`scvi.model.base.RNASeqMixin.get_importance_weights` (anchors scored with the full
        native + ambient likelihood, consistent with :meth:`get_marginal_ll`), returned as float64
        weights that sum to 1 (scvi-tools' float32 weights can miss 1 by more than
        :func:`numpy.random.choice` accepts, which made ``weights="importance"`` fail at random).

        Parameters
        ----------
        adata
            Data to use for computing importance weights.
        indices
            Indices of cells in adata to use.
        qz
            Variational posterior distributions of the cells, aligned with indices.
        px
            Count distributions of the cells, aligned with indices.
        zs
            Samples associated with indices.
        max_cells
            Maximum number of cells used to estimated the importance weights.
        truncation
            Whether importance weights should be truncated (Ionides, 2008).
        n_mc_samples
            Number of Monte Carlo samples to use for estimating the importance weights.
        n_mc_samples_per_pass
            Number of Monte Carlo samples to use for each pass.
        **data_loader_kwargs
            Keyword args for data loader.

        Returns
        -------
        Array of importance weights (float64, summing to 1) aligned with the provided `indices`.
        """
        w = super().get_importance_weights(
            adata,
            indices,
            qz=qz,
            px=px,
            zs=zs,
            max_cells=max_cells,
            truncation=truncation,
            n_mc_samples=n_mc_samples,
            n_mc_samples_per_pass=n_mc_samples_per_pass,
            **data_loader_kwargs,
        )
        w = np.asarray(w, dtype=np.float64)
        return w / w.sum()


def _nonzeros(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values (int32), column indices (int32) and per-row counts of the non-zeros of a dense 2-D array."""
    flat = np.flatnonzero(a)
    return _nonzeros_at(a.ravel()[flat], flat, a.shape)


def _nonzeros_at(values: np.ndarray, flat: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_nonzeros` of a dense array of ``shape`` holding ``values`` at the flat positions ``flat``."""
    keep = values != 0
    rows, cols = np.divmod(flat[keep], shape[1])
    return values[keep].astype(np.int32), cols.astype(np.int32), np.bincount(rows, minlength=shape[0])


def _csr_from_parts(parts, n_cols: int) -> sparse.csr_matrix:
    """Stack the row blocks of :func:`_nonzeros` into one CSR matrix (no per-block sparse matrices)."""
    if not parts:
        return sparse.csr_matrix((0, n_cols), dtype=np.int32)
    data, indices, per_row = (np.concatenate(p) for p in zip(*parts, strict=True))
    indptr = np.zeros(per_row.size + 1, dtype=np.int64)
    np.cumsum(per_row, out=indptr[1:])
    return sparse.csr_matrix((data, indices, indptr), shape=(per_row.size, n_cols))
