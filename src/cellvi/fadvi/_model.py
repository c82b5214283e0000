"""cellvi.FADVI: the user API (AnnData in, numpy / pandas out; no maths here)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
)
from scvi.model._utils import _init_library_size, use_distributed_sampler
from scvi.model.base import ArchesMixin, BaseModelClass, RNASeqMixin, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from .._base import RegistryMixin
from .._training import TrainRunner
from .._validation import check_counts, check_layer, check_obs_key, get_matrix, layer_arg
from ..dataloaders import SemiSupervisedDataPathMixin, make_data_loader, with_data_path
from ._constants import PREDICTION_MODES, REPRESENTATIONS
from ._module import FADVAE
from ._plan import FADVITrainingPlan

logger = logging.getLogger(__name__)

_MODULE_EXTRA_KWARGS = (
    "beta_b",
    "beta_l",
    "adversary_scale",
    "alpha_res",
    "whiten_ridge",
    "alpha_kernel",
    "log_variational",
)


class FADVI(
    RegistryMixin,
    SemiSupervisedDataPathMixin,
    RNASeqMixin,
    VAEMixin,
    ArchesMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Factor Disentanglement Variational Inference model.

    This model disentangles batch-related variation, label-related variation, and residual variation
    using adversarial training and cross-covariance penalties. Three batch-conditioned encoders give
    ``z_b`` (batch), ``z_l`` (label) and ``z_r`` (residual); one scVI decoder maps their concatenation
    to the counts. A batch head on ``z_b`` and a label head on ``z_l`` are supervised; four
    adversaries (label from ``z_b``, batch from ``z_l``, batch and label from ``z_r``) remove what
    must not be there; a penalty on the cross-covariance of the three blocks decorrelates them.

    What cellvi does differently from ``fadvi`` 0.3 (see ``docs`` of :mod:`cellvi.fadvi`):

    - **Conditional priors and block KL weights.** ``p(z_b|s) = N(m_s, I)`` and ``p(z_l|y) =
      N(m_y, I)`` with learned means, so batch (label) identity is free in ``z_b`` (``z_l``), while
      any other information there costs ``beta_b`` = 5 (``beta_l`` = 2) times what it costs in
      ``z_r`` (prior ``N(0, I)``). Variation that is neither batch nor label (a cell-cycle-like
      program) is therefore cheapest in ``z_r``: it is what makes the residual factor real.
      Unlabeled cells use the label head's posterior to weigh the label components, so they get a
      label signal too.
    - **KL warm-up over the first quarter of the run** (not 400 epochs while users train 30).
    - **Adversaries that see what a probe sees.** Each adversary learns on detached posterior
      means of its block. ``z_b`` is centred within each batch, ``z_l`` within each label and
      ``z_r`` over the minibatch (minibatch group means), then *whitened* by the pooled
      within-group covariance: a leak lives in the small within-group variation, along any of its
      directions (a probe reads it inside one tight batch or label cluster, whatever its scale),
      and what batch composition implies about labels stays allowed when batch and label are
      confounded. The encoders are pushed, with scale ``alpha_* x 50``, towards adversary outputs
      that carry no information (uniform: bounded, unlike maximising the adversary's
      cross-entropy), plus a penalty on the class-mean differences of the whitened block (batches
      within labels for ``z_l``, labels within batches for ``z_b``), the linear leak an online
      adversary misses. Neither ``z_b`` nor ``z_l`` may predict ``z_r`` (two more adversaries plus
      their squared correlations). Whitening replaced a column-by-column scaling, under which one
      large within-batch direction of ``z_b`` hid the label differences along the others from the
      adversary but not from a fresh probe. A nearest-neighbour probe also reads structure that
      is not linear, or lives in near-empty directions, inside one tight batch (label) cluster: a
      kernel alignment within groups (``alpha_kernel``, default 1) measures it for ``z_b`` (label
      within batch) and ``z_l`` (batch within label). On the default ``benchmarks/fadvi.py`` data
      (4000 cells, 3 batches, 6 types, 30 epochs; means over data seeds 0-4, ``fadvi`` 0.3 in
      brackets) fresh probes give label from ``z_b`` 0.25 (0.24; the batch composition alone gives
      0.22), batch from ``z_l`` 0.45 (0.51), batch from ``z_r`` 0.37 (0.40), label from ``z_r`` 0.18
      (0.21), the residual from ``z_b`` and ``z_l`` R^2 0.02 and 0.01 (0.54, 0.36): see
      :class:`FADVAE`. Label from ``z_b`` varies most between seeds (0.21-0.33): in some runs a
      share of one type's cells in one batch sits far out along one ``z_b`` direction (with lower
      library sizes), which a nearest-neighbour probe reads and the terms above do not pull back.
    - **Deterministic encoders** (LayerNorm, no dropout): training sees the embedding users get.
      With BatchNorm running statistics or dropout, leaks hidden from the adversaries during
      training reappear at inference. ``dropout_rate`` applies to the supervised heads (the
      adversaries, like a probe, have none).
    - The supervised heads read posterior means, as :meth:`predict` does. Posterior means for
      embeddings and predictions (deterministic), covariates passed correctly, ``size_factor_key``
      and ``gene-label`` dispersion honoured, ``transform_batch`` as a real counterfactual (``z_b``
      moved by ``m_t - m_s``).
    - **The shared data path** (:mod:`cellvi.dataloaders`, ``train(..., data_path="auto")``):
      scvi's semi-supervised split and pair of minibatches per step (all cells, labelled cells),
      gathered from one device-resident copy of the data. ``fadvi`` loads the labelled minibatch
      and ignores it; here the label head learns on it as well (only ``z_l``'s encoder runs on
      it), so it sees a full minibatch of labels per step however few cells are labelled, and
      ``n_samples_per_label`` balances the classes.

    Parameters
    ----------
    adata
        AnnData object that has been registered via :meth:`setup_anndata`.
    registry
        Registry of the datamodule used to train FADVI model.
    n_hidden
        Number of nodes per hidden layer.
    n_latent_b
        Dimensionality of the batch latent space.
    n_latent_l
        Dimensionality of the label latent space.
    n_latent_r
        Dimensionality of the residual latent space.
    n_layers
        Number of hidden layers used for encoder and decoder NNs.
    dropout_rate
        Dropout rate for neural networks (the supervised classifier heads; the encoders and
        adversaries run without dropout).
    dispersion
        One of the following:

        * ``'gene'`` - dispersion parameter of NB is constant per gene across cells
        * ``'gene-batch'`` - dispersion can differ between different batches
        * ``'gene-label'`` - dispersion can differ between different labels (unlabeled cells share one)
        * ``'gene-cell'`` - dispersion can differ for every gene in every cell
    gene_likelihood
        One of:

        * ``'nb'`` - Negative binomial distribution
        * ``'zinb'`` - Zero-inflated negative binomial distribution
        * ``'poisson'`` - Poisson distribution
    use_observed_lib_size
        If True, use the observed library size for RNA as the scaling factor in the mean of the
        conditional distribution.
    beta
        Weight for KL divergence in ELBO.
    lambda_b
        Weight for batch classification loss.
    lambda_l
        Weight for label classification loss.
    alpha_bl
        Weight for adversarial loss (label prediction from batch latents).
    alpha_lb
        Weight for adversarial loss (batch prediction from label latents).
    alpha_rb
        Weight for adversarial loss (batch prediction from residual latents).
    alpha_rl
        Weight for adversarial loss (label prediction from residual latents).
    gamma
        Weight for the cross-covariance penalty (sum of squared entries of the cross-covariance
        matrices of the three blocks, per minibatch).
    **model_kwargs
        Keyword args for :class:`~cellvi.fadvi.FADVAE`: ``beta_b`` (default 5) and ``beta_l``
        (default 2), the extra KL weight of ``z_b`` and ``z_l`` relative to ``z_r``;
        ``adversary_scale`` (default 50, the scale of all adversarial terms, comparable to
        ``lambda_*``), ``alpha_res`` (default 1, the weight of the "z_b / z_l must not predict z_r"
        terms), ``whiten_ridge`` (default 0.01, the ridge, relative to the mean within-group
        variance, of the covariance by which the adversaries whiten each block), ``alpha_kernel``
        (default 1, the weight of the within-group kernel alignment of ``z_b`` with the label and
        of ``z_l`` with the batch; 0 turns it off) and ``log_variational`` (default True).

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate_batches(n_cells=300, n_genes=100, seed=0)
    >>> cellvi.FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    >>> model = cellvi.FADVI(adata, n_latent_b=5, n_latent_l=5, n_latent_r=2)
    >>> model.train(max_epochs=2, enable_progress_bar=False)
    >>> adata.obsm["X_fadvi_b"] = model.get_latent_representation(representation="b")
    >>> adata.obsm["X_fadvi_l"] = model.get_latent_representation(representation="l")
    >>> adata.obsm["X_fadvi_r"] = model.get_latent_representation(representation="r")
    >>> adata.obsm["X_fadvi_l"].shape
    (300, 5)
    """

    _module_cls = FADVAE
    _training_plan_cls = FADVITrainingPlan
    _train_runner_cls = TrainRunner
    _data_loader_cls = staticmethod(make_data_loader)

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent_b: int = 30,
        n_latent_l: int = 30,
        n_latent_r: int = 10,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        use_observed_lib_size: bool = True,
        beta: float = 1.0,
        lambda_b: float = 50,
        lambda_l: float = 50,
        alpha_bl: float = 1.0,
        alpha_lb: float = 1.0,
        alpha_rb: float = 1.0,
        alpha_rl: float = 1.0,
        gamma: float = 1.0,
        **model_kwargs,
    ):
        if adata is None and registry is None:
            raise ValueError(
                "adata or registry must be provided (register the data with FADVI.setup_anndata)."
            )
        super().__init__(adata, registry)
        for name, value in (
            ("n_hidden", n_hidden),
            ("n_latent_b", n_latent_b),
            ("n_latent_l", n_latent_l),
            ("n_latent_r", n_latent_r),
            ("n_layers", n_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
        if dispersion not in ("gene", "gene-batch", "gene-label", "gene-cell"):
            raise ValueError(
                f"dispersion must be one of 'gene', 'gene-batch', 'gene-label', 'gene-cell', got {dispersion!r}."
            )
        if gene_likelihood not in ("zinb", "nb", "poisson"):
            raise ValueError(
                f"gene_likelihood must be one of 'zinb', 'nb', 'poisson', got {gene_likelihood!r}."
            )
        for name, value in (
            ("beta", beta),
            ("lambda_b", lambda_b),
            ("lambda_l", lambda_l),
            ("alpha_bl", alpha_bl),
            ("alpha_lb", alpha_lb),
            ("alpha_rb", alpha_rb),
            ("alpha_rl", alpha_rl),
            ("gamma", gamma),
        ):
            if not isinstance(value, (int, float, np.integer, np.floating)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        unknown = sorted(set(model_kwargs) - set(_MODULE_EXTRA_KWARGS))
        if unknown:
            raise ValueError(
                f"Unknown keyword argument(s) {unknown} for FADVI; model_kwargs accepts {list(_MODULE_EXTRA_KWARGS)}. "
                "Data arguments (batch_key, labels_key, unlabeled_category, ...) go to FADVI.setup_anndata."
            )

        reg = self.registry_["field_registries"]
        batch_state = reg[REGISTRY_KEYS.BATCH_KEY]["state_registry"]
        label_state = reg[REGISTRY_KEYS.LABELS_KEY]["state_registry"]
        n_batch = len(batch_state["categorical_mapping"])
        label_mapping = list(label_state["categorical_mapping"])
        unlabeled = label_state.get("unlabeled_category")
        unlabeled_code = label_mapping.index(unlabeled) if unlabeled in label_mapping else None
        n_classes = len(label_mapping) - (unlabeled_code is not None)
        if n_classes < 1:
            raise ValueError(
                "labels_key holds no labeled cell: every cell is the unlabeled category; at least one "
                "labeled cell per class is needed to train the label head."
            )
        n_cats_per_cov = None
        cat_state = reg.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
        if cat_state.get("n_cats_per_key"):
            n_cats_per_cov = list(cat_state["n_cats_per_key"])
        n_cont = int(self.summary_stats.get("n_extra_continuous_covs", 0))
        use_size_factor = REGISTRY_KEYS.SIZE_FACTOR_KEY in reg and bool(
            self.registry_["setup_args"].get("size_factor_key")
        )
        lib_means = lib_vars = None
        if not use_observed_lib_size:
            if self.adata is None:
                raise ValueError(
                    "use_observed_lib_size=False needs adata (the library prior is computed from it)."
                )
            lib_means, lib_vars = _init_library_size(self.adata_manager, n_batch)
        if n_batch == 1:
            warnings.warn(
                "FADVI: the data hold a single batch, so z_b cannot carry batch variation and the batch "
                "terms are constant; z_l and z_r still separate label and residual variation.",
                UserWarning,
                stacklevel=2,
            )

        self.module = self._module_cls(
            n_input=int(self.summary_stats["n_vars"]),
            n_batch=n_batch,
            n_labels=n_classes,
            n_label_codes=len(label_mapping),
            unlabeled_code=unlabeled_code,
            n_hidden=n_hidden,
            n_latent_b=n_latent_b,
            n_latent_l=n_latent_l,
            n_latent_r=n_latent_r,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            use_observed_lib_size=use_observed_lib_size,
            library_log_means=lib_means,
            library_log_vars=lib_vars,
            n_continuous_cov=n_cont,
            n_cats_per_cov=n_cats_per_cov,
            use_size_factor_key=use_size_factor,
            beta=beta,
            lambda_b=lambda_b,
            lambda_l=lambda_l,
            alpha_bl=alpha_bl,
            alpha_lb=alpha_lb,
            alpha_rb=alpha_rb,
            alpha_rl=alpha_rl,
            gamma=gamma,
            **model_kwargs,
        )
        self._set_batch_mapping()
        self._model_summary_string = (
            f"FADVI: z_b {n_latent_b}, z_l {n_latent_l}, z_r {n_latent_r}; {n_batch} batches, {n_classes} labels"
            f"{' + unlabeled' if unlabeled_code is not None else ''}; {gene_likelihood}, dispersion {dispersion}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> AnnDataManager | None:
        """Set up AnnData object for FADVI model.

        A mapping will be created between data fields used by FADVI and AnnData objects. The
        data are checked (counts, keys, missing values) and not modified, except for the
        registered fields scvi-tools writes: ``.uns['_scvi_uuid']``, ``.uns['_scvi_manager_uuid']``
        and the encoded ``.obs['_scvi_batch']`` / ``.obs['_scvi_labels']`` columns.

        Parameters
        ----------
        adata
            AnnData object. Rows represent cells, columns represent features.
        layer
            If not None, uses this as the key in adata.layers for raw count data.
        batch_key
            key in adata.obs for batch information. Categories will automatically be converted into
            integer categories and saved to adata.obs['_scvi_batch']. If None, assigns the same batch
            to all the data.
        labels_key
            key in adata.obs for label information. Categories will automatically be converted into
            integer categories and saved to adata.obs['_scvi_labels']. Required: FADVI's label factor
            is supervised (mark cells without a label with ``unlabeled_category``).
        unlabeled_category
            value in adata.obs[labels_key] that indicates unlabeled observations. It may be absent
            (all cells labeled).
        size_factor_key
            key in adata.obs for size factor information. Instead of using library size as a size
            factor, the provided size factor column will be used as offset in the mean of the
            likelihood. Assumed to be on linear scale.
        categorical_covariate_keys
            keys in adata.obs that correspond to categorical data. These covariates can be added in
            addition to the batch covariate and are also treated as nuisance factors (i.e., the model
            tries to minimize their effects on the latent space). Thus, these should not be used for
            biologically-relevant factors that you do _not_ want to correct for.
        continuous_covariate_keys
            keys in adata.obs that correspond to continuous data. These covariates can be added in
            addition to the batch covariate and are also treated as nuisance factors (i.e., the model
            tries to minimize their effects on the latent space). Thus, these should not be used for
            biologically-relevant factors that you do _not_ want to correct for.
        **kwargs
            Passed to the scvi-tools fields (used by query mapping: ``source_registry``,
            ``extend_categories``, ``allow_missing_labels``).

        Returns
        -------
        None. Adds the following fields:

        .uns['_scvi']
            scvi setup dictionary
        .obs['_scvi_labels']
            labels encoded as integers
        .obs['_scvi_batch']
            batch encoded as integers
        """
        cls._check_setup_inputs(
            adata,
            layer,
            batch_key,
            labels_key,
            unlabeled_category,
            size_factor_key,
            categorical_covariate_keys,
            continuous_covariate_keys,
            query="source_registry" in kwargs,
        )
        setup_method_args = cls._get_setup_method_args(**locals())
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @staticmethod
    def _check_setup_inputs(
        adata,
        layer,
        batch_key,
        labels_key,
        unlabeled_category,
        size_factor_key,
        cat_keys,
        cont_keys,
        query=False,
    ) -> None:
        if not isinstance(adata, AnnData):
            raise ValueError(f"adata must be an AnnData object, got {type(adata).__name__}.")
        if labels_key is None:
            raise ValueError(
                "labels_key is required: FADVI's label factor z_l is supervised by adata.obs[labels_key]. "
                f"Mark cells without a label with unlabeled_category ({unlabeled_category!r})."
            )
        check_layer(adata, layer)
        check_counts(get_matrix(adata, layer), layer_arg(layer))
        check_obs_key(adata, batch_key, "batch_key")
        check_obs_key(adata, labels_key, "labels_key")
        labels = adata.obs[labels_key].astype(str)
        present = set(labels.unique())
        if unlabeled_category not in present:
            near = [c for c in present if c.lower() == str(unlabeled_category).lower()]
            if near:
                raise ValueError(
                    f"unlabeled_category={unlabeled_category!r} is absent from adata.obs[{labels_key!r}], "
                    f"which holds {near[0]!r}; pass unlabeled_category={near[0]!r} if those cells are unlabeled."
                )
        if len(present - {unlabeled_category}) == 0 and not query:
            raise ValueError(
                f"labels_key={labels_key!r}: every cell is {unlabeled_category!r}; FADVI needs labeled cells "
                "to learn the label factor."
            )
        if size_factor_key is not None:
            check_obs_key(adata, size_factor_key, "size_factor_key")
            sf = pd.to_numeric(adata.obs[size_factor_key], errors="coerce").to_numpy()
            if not np.all(np.isfinite(sf)) or np.any(sf <= 0):
                raise ValueError(f"size_factor_key={size_factor_key!r}: size factors must be finite and > 0.")
        for arg, keys in (("categorical_covariate_keys", cat_keys), ("continuous_covariate_keys", cont_keys)):
            if keys is None:
                continue
            if isinstance(keys, str) or not isinstance(keys, Sequence):
                raise ValueError(f"{arg} must be a list of adata.obs column names, got {keys!r}.")
            for key in keys:
                check_obs_key(adata, key, arg)
                if arg == "continuous_covariate_keys":
                    col = adata.obs[key]
                    if not pd.api.types.is_numeric_dtype(col):
                        raise ValueError(
                            f"{arg}: adata.obs[{key!r}] has dtype {col.dtype}; expected numbers."
                        )
                    if not np.all(np.isfinite(col.to_numpy(dtype=float))):
                        raise ValueError(f"{arg}: adata.obs[{key!r}] holds infinite values.")

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        early_stopping: bool = False,
        n_samples_per_label: int | None = None,
        data_path: str = "auto",
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        **trainer_kwargs,
    ):
        """Train the model (Lightning; progress bar unless ``enable_progress_bar=False``).

        Parameters
        ----------
        max_epochs
            Number of passes through the data. Defaults to ``min(round(20000 / n_cells * 400), 400)``.
        accelerator, devices
            Lightning accelerator and devices.
        train_size
            Fraction of cells used for training (default 0.9).
        validation_size
            Fraction of cells used for validation (default ``1 - train_size``).
        shuffle_set_split
            Shuffle cells before the train / validation split.
        batch_size
            Minibatch size. When the last training minibatch would hold one or two cells (which
            BatchNorm cannot train on), it is dropped each epoch (``drop_last``); shuffling changes
            which cells are left out.
        early_stopping
            Stop when the validation ELBO stops improving.
        n_samples_per_label
            Number of subsamples for each label class to sample per epoch in the labelled
            minibatches. By default, there is no label subsampling.
        data_path
            How minibatches reach the model (:mod:`cellvi.dataloaders`). ``"auto"`` (default):
            the registered arrays on the training device when they fit in half its free memory
            (always on the CPU), else streamed from the CPU through pinned memory. ``"device"``,
            ``"stream"``: those two explicitly. ``"scvi"``: scvi-tools' semi-supervised loader.
            On the CPU, ``"device"`` and ``"scvi"`` give identical minibatches, hence identical
            seeded training, when every cell is labelled; with unlabelled cells the shorter
            labelled loader restarts with a fresh shuffle here, where scvi replays its first pass.
        datasplitter_kwargs
            Keyword arguments for :class:`~cellvi.dataloaders.SemiSupervisedDataSplitter`: the
            train / validation split keeps the ratio of labelled to unlabelled cells, and each step
            reads a minibatch of all cells and one of labelled cells (the label head learns on
            both; see :class:`~cellvi.fadvi.FADVAE`).
        plan_kwargs
            Keyword arguments for :class:`~cellvi.fadvi.FADVITrainingPlan` (``lr``,
            ``weight_decay``, ``n_epochs_kl_warmup``...). ``n_epochs_kl_warmup`` defaults to a
            quarter of ``max_epochs`` (at least 1): the KL reaches full weight during the run.
        datamodule
            A LightningDataModule to train from instead of ``adata`` (e.g. a fast data path).
        **trainer_kwargs
            Keyword arguments for :class:`~scvi.train.Trainer` (``check_val_every_n_epoch``,
            ``enable_progress_bar``...).
        """
        n_obs = self.adata.n_obs if self.adata is not None else getattr(datamodule, "n_obs", None)
        if max_epochs is None:
            if n_obs is None:
                raise ValueError("max_epochs must be given when training from a datamodule without n_obs.")
            max_epochs = int(min(round(20000 / n_obs * 400), 400))
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, np.integer)) or max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {max_epochs!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}.")
        plan_kwargs = dict(plan_kwargs or {})
        if "n_epochs_kl_warmup" not in plan_kwargs and "n_steps_kl_warmup" not in plan_kwargs:
            plan_kwargs["n_epochs_kl_warmup"] = max(1, int(max_epochs) // 4)
        if n_samples_per_label is not None and (
            isinstance(n_samples_per_label, bool)
            or not isinstance(n_samples_per_label, (int, np.integer))
            or n_samples_per_label < 1
        ):
            raise ValueError(
                f"n_samples_per_label must be an integer >= 1 or None, got {n_samples_per_label!r}."
            )
        datasplitter_kwargs = dict(datasplitter_kwargs or {})
        if datamodule is None:
            tsize = 0.9 if train_size is None else train_size
            if not 0 < tsize <= 1:
                raise ValueError(f"train_size must be in (0, 1], got {train_size!r}.")
            # the split keeps the labelled / unlabelled ratio: each part is split on its own
            codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
            unlabeled = self.module.unlabeled_code
            n_labeled = n_obs if unlabeled is None else int(np.count_nonzero(codes != unlabeled))
            n_train = int(np.ceil(tsize * n_labeled)) + int(np.ceil(tsize * (n_obs - n_labeled)))
            if 0 < n_train % batch_size < 3 and n_train > batch_size:
                datasplitter_kwargs.setdefault("drop_last", True)
            elif n_train < 3:
                raise ValueError(
                    f"train_size={tsize} leaves {n_train} training cells; at least 3 are needed."
                )
            train_size = tsize
            # the splitter is built here (scvi's UnsupervisedTrainingMixin would pass it
            # load_sparse_tensor, which scvi's semi-supervised loader rejects)
            datamodule = self._data_splitter_cls(
                self.adata_manager,
                train_size=train_size,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                n_samples_per_label=n_samples_per_label,
                batch_size=int(batch_size),
                distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
                **with_data_path(datasplitter_kwargs, data_path),
            )
            if n_labeled > 0:
                # a fresh per-class subsample of the labelled cells every epoch (scvi's callback)
                from scvi.train._callbacks import SubSampleLabels

                callbacks = list(trainer_kwargs.get("callbacks") or [])
                if not any(isinstance(c, SubSampleLabels) for c in callbacks):
                    trainer_kwargs["callbacks"] = [*callbacks, SubSampleLabels()]
        trainer_kwargs.setdefault("enable_model_summary", False)
        return super().train(
            max_epochs=int(max_epochs),
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            batch_size=int(batch_size),
            early_stopping=early_stopping,
            datasplitter_kwargs=datasplitter_kwargs,
            plan_kwargs=plan_kwargs,
            datamodule=datamodule,
            **trainer_kwargs,
        )

    # ----------------------------------------------------------------- helpers
    def _set_batch_mapping(self) -> None:
        """Set up batch mapping for converting codes to original batch labels."""
        mapping = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"][
            "categorical_mapping"
        ]
        self._code_to_batch = np.asarray(mapping)

    def _get_unlabeled_category_index(self) -> int | None:
        """Get the index of the unlabeled category if it exists."""
        return self.module.unlabeled_code

    def _get_label_mapping_for_predictions(self) -> np.ndarray:
        """Get label mapping excluding unlabeled category for predictions."""
        mapping = np.asarray(
            self.registry_["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"][
                "categorical_mapping"
            ]
        )
        code = self._get_unlabeled_category_index()
        return mapping if code is None else np.delete(mapping, code)

    def _get_code_to_label_for_predictions(self) -> dict[int, str]:
        """Get code-to-label mapping excluding unlabeled category for predictions."""
        return dict(enumerate(self._get_label_mapping_for_predictions().tolist()))

    def _classes(self, mode: str) -> np.ndarray:
        return self._code_to_batch if mode == "batch" else self._get_label_mapping_for_predictions()

    def _iter(self, adata, indices, batch_size):
        adata = self._validate_anndata(adata)
        dl = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, shuffle=False)
        return adata, dl

    def _obs_names(self, adata, indices) -> pd.Index:
        return adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]

    @staticmethod
    def _unpack(tensors):
        return (
            tensors[REGISTRY_KEYS.X_KEY],
            tensors[REGISTRY_KEYS.BATCH_KEY],
            tensors.get(REGISTRY_KEYS.CAT_COVS_KEY),
            tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
        )

    # ------------------------------------------------------------ latent space
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        representation: Literal[
            "full", "b", "batch", "l", "label", "r", "residual", "lr", "label_residual"
        ] = "label",
    ) -> np.ndarray | dict[str, np.ndarray | torch.distributions.Normal]:
        """Return the latent representation for each cell.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If None, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If None, all cells are used.
        give_mean
            Give mean of distribution (deterministic: the same result every call) or sample from it.
        mc_samples
            For distributions that have no closed-form mean (e.g. LogNormal), how many Monte Carlo
            samples to take for computing mean. FADVI's posteriors are Gaussian, whose mean is
            closed-form, so this is not used.
        batch_size
            Minibatch size for data loading into model. Defaults to scvi.settings.batch_size.
        return_dist
            If True, return a mapping with ``"mean"`` and ``"var"`` (numpy, cells x dims) of the
            posterior of the requested blocks, ``"dist"`` (a :class:`torch.distributions.Normal`
            over all cells) and ``"sample"`` (one draw) when ``give_mean=False``.
        representation
            Which latent representation to return:

            - ``"full"``: concatenated representation [z_b, z_l, z_r]
            - ``"b"`` or ``"batch"``: batch representation only
            - ``"l"`` or ``"label"``: label representation only (use it for integration)
            - ``"r"`` or ``"residual"``: residual representation only
            - ``"lr"`` or ``"label_residual"``: concatenated label and residual representation

        Returns
        -------
        latent_representation
            ``(n_cells, n_dims)`` float32 array, or the mapping described under ``return_dist``.
        """
        if representation not in REPRESENTATIONS:
            raise ValueError(
                f"representation must be one of {sorted(REPRESENTATIONS)}, got {representation!r}."
            )
        self._check_if_trained(warn=False)
        blocks = REPRESENTATIONS[representation]
        _, dl = self._iter(adata, indices, batch_size)
        self.module.eval()
        locs, scales = [], []
        for tensors in dl:
            x, b, cat, cont = (t.to(self.device) if t is not None else None for t in self._unpack(tensors))
            qs = self.module.encode(x, b, cont, cat)
            locs.append(torch.cat([qs[k].loc for k in blocks], -1).cpu())
            scales.append(torch.cat([qs[k].scale for k in blocks], -1).cpu())
        loc, scale = torch.cat(locs), torch.cat(scales)
        sample = None if give_mean else torch.distributions.Normal(loc, scale).sample()
        if return_dist:
            out = {
                "mean": loc.numpy(),
                "var": scale.pow(2).numpy(),
                "dist": torch.distributions.Normal(loc, scale),
            }
            if sample is not None:
                out["sample"] = sample.numpy()
            return out
        return (loc if give_mean else sample).numpy()

    # -------------------------------------------------------------- prediction
    def _batch_classifier_for_interpretability(self, x, batch_index=None, cat_covs=None, cont_covs=None):
        """Classifier function for batch prediction with interpretability methods (probabilities)."""
        return torch.softmax(
            self.module.batch_logits(self.module.encode(x, batch_index, cont_covs, cat_covs)["b"].loc), -1
        )

    def _label_classifier_for_interpretability(self, x, batch_index=None, cat_covs=None, cont_covs=None):
        """Classifier function for label prediction with interpretability methods (probabilities)."""
        return torch.softmax(
            self.module.label_logits(self.module.encode(x, batch_index, cont_covs, cat_covs)["l"].loc), -1
        )

    def _compute_predictions(self, x, batch_index, cat_covs, cont_covs, prediction_mode: str, soft: bool):
        """Compute predictions (probabilities if ``soft`` else class codes) for a minibatch, from posterior means."""
        fn = (
            self._batch_classifier_for_interpretability
            if prediction_mode == "batch"
            else self._label_classifier_for_interpretability
        )
        probs = fn(x, batch_index, cat_covs, cont_covs)
        return probs if soft else probs.argmax(-1)

    def _format_predictions(
        self, predictions, prediction_mode: str, soft: bool, adata, indices, return_numpy=True
    ):
        """Format predictions: class names (hard) or probabilities (soft); pandas when not ``return_numpy``."""
        classes = self._classes(prediction_mode)
        pred = predictions.cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
        names = self._obs_names(adata, indices)
        if soft:
            pred = pred.astype(np.float32)
            return (
                pred
                if return_numpy
                else pd.DataFrame(pred, index=names, columns=pd.Index(classes.astype(str)))
            )
        labels = classes[pred]
        if return_numpy:
            return labels
        return pd.Series(pd.Categorical(labels, categories=classes), index=names, name=prediction_mode)

    def _validate_interpretability_setup(self, method: str | None) -> None:
        """Validate interpretability method and dependencies."""
        if method is None:
            return
        if method not in ("ig", "gs"):
            raise ValueError(f"interpretability must be None, 'ig' or 'gs', got {method!r}.")
        from ._attributions import require_captum

        require_captum()

    def _compute_attributions(
        self,
        method,
        x,
        predictions,
        soft,
        batch_index,
        cat_covs,
        cont_covs,
        prediction_mode,
        method_args=None,
    ) -> torch.Tensor:
        """Compute feature attributions using the specified interpretability method.

        The target of every cell is its predicted class (the arg-max when ``soft``); the output is that
        class's probability; the baseline is zero counts.
        """
        from ._attributions import attribute

        fn = (
            self._batch_classifier_for_interpretability
            if prediction_mode == "batch"
            else self._label_classifier_for_interpretability
        )
        target = predictions.argmax(-1) if soft else predictions
        return attribute(method, fn, x, target, (batch_index, cat_covs, cont_covs), method_args)

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        prediction_mode: Literal["b", "batch", "l", "label"] = "label",
        soft: bool = False,
        batch_size: int | None = None,
        return_numpy: bool = True,
        interpretability: Literal["ig", "gs"] | None = None,
        interpretability_args: dict | None = None,
        return_dict: bool = True,
    ):
        """Predict batch or label categories using the supervised classification heads.

        This method uses the trained encoders (posterior means, so predictions are deterministic)
        and classification heads to predict either batch categories (using batch latent b) or
        label categories (using label latent l).

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If None, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If None, all cells are used.
        prediction_mode
            What to predict: ``"b"`` or ``"batch"``: batch categories from z_b and the batch
            classifier; ``"l"`` or ``"label"``: label categories from z_l and the label classifier.
        soft
            If True, return class probabilities. If False, return class predictions (names).
        batch_size
            Minibatch size for data loading into model. Defaults to scvi.settings.batch_size.
        return_numpy
            Return a ndarray; otherwise a pandas object indexed by obs_names (a Series of
            categories, or a DataFrame of probabilities with one column per class).
        interpretability
            If None, perform regular prediction. If ``"ig"``, use Integrated Gradients to compute
            feature attributions for predictions. If ``"gs"``, use GradientShap. Requires captum
            (``pip install cellvi[interpret]``).
        interpretability_args
            Keyword arguments for the interpretability method (e.g. ``n_steps`` for IG,
            ``n_samples`` and ``stdevs`` for GradientShap; ``seed`` makes GradientShap's random
            baselines reproducible, default 0).
        return_dict
            If True, return interpretability results as dict. If False, return as tuple
            ``(predictions, attributions)``. Only affects interpretability results.

        Returns
        -------
        predictions or dict/tuple with predictions and attributions
            Without interpretability: class names ``(n_cells,)`` or probabilities
            ``(n_cells, n_classes)``. With it: ``{"predictions": ..., "attributions": (n_cells,
            n_genes) float32 array}`` (attribution of each gene's counts to the predicted class's
            probability, per cell).
        """
        if prediction_mode not in PREDICTION_MODES:
            raise ValueError(
                f"prediction_mode must be one of {sorted(PREDICTION_MODES)}, got {prediction_mode!r}."
            )
        mode = PREDICTION_MODES[prediction_mode]
        self._validate_interpretability_setup(interpretability)
        self._check_if_trained(warn=False)
        adata, dl = self._iter(adata, indices, batch_size)
        self.module.eval()
        preds, attrs = [], []
        for tensors in dl:
            x, b, cat, cont = (t.to(self.device) if t is not None else None for t in self._unpack(tensors))
            with torch.inference_mode():
                p = self._compute_predictions(x, b, cat, cont, mode, soft)
            preds.append(p.cpu())
            if interpretability is not None:
                a = self._compute_attributions(
                    interpretability, x, p.clone(), soft, b, cat, cont, mode, interpretability_args
                )
                attrs.append(a.detach().cpu().float())
        out = self._format_predictions(torch.cat(preds), mode, soft, adata, indices, return_numpy)
        if interpretability is None:
            return out
        attributions = torch.cat(attrs).numpy()
        return {"predictions": out, "attributions": attributions} if return_dict else (out, attributions)

    def get_ranked_features(
        self,
        adata: AnnData | None = None,
        attributions: np.ndarray | dict | None = None,
        top_n: int | None = None,
        groups: Sequence | None = None,
    ) -> pd.DataFrame:
        """Get ranked gene list based on feature attribution scores.

        Parameters
        ----------
        adata
            AnnData object that has been registered via setup_anndata(). If None, uses the AnnData
            object used to initialize the model. Its var_names name the features.
        attributions
            Attribution matrix from interpretability analysis with shape (n_cells, n_genes), as
            returned by :meth:`predict` with ``interpretability="ig"`` or ``"gs"``; the whole dict
            that :meth:`predict` returns is accepted too (its hard predictions are then the groups).
        top_n
            Number of top features to return (per group). If None, returns all features.
        groups
            Per-cell group (e.g. the predicted class) to rank within. When given (or taken from the
            dict), the result holds the overall ranking (``group == "all"``) followed by one ranking
            per group.

        Returns
        -------
        pd.DataFrame
            Ranked features with columns ``feature``, ``feature_idx``, ``attribution_mean``,
            ``attribution_std``, ``attribution_abs_mean``, ``n_cells`` (and ``group`` and ``rank``
            when ranking per group), sorted by ``attribution_abs_mean``.
        """
        from ._attributions import rank_features

        adata = self.adata if adata is None else adata
        if isinstance(attributions, dict):
            if "attributions" not in attributions:
                raise ValueError(
                    "attributions: a dict must be predict()'s result with an 'attributions' key."
                )
            if groups is None:
                pred = np.asarray(attributions.get("predictions"))
                groups = pred if pred.ndim == 1 else self._get_label_mapping_for_predictions()[pred.argmax(1)]
            attributions = attributions["attributions"]
        if attributions is None:
            raise ValueError(
                "attributions is required: pass predict(..., interpretability='ig')['attributions']."
            )
        return rank_features(np.asarray(attributions), adata.var_names, top_n=top_n, groups=groups)

    # ------------------------------------------------------------ query data
    @classmethod
    def load_query_data(cls, adata: AnnData = None, reference_model=None, **kwargs):
        """Online update of a reference model with scArches (new batches of ``adata``).

        The query genes must be the reference genes in the same order; genes the reference has
        not seen raise a :class:`ValueError` (use :meth:`prepare_query_anndata` to pad and reorder).
        The per-batch prior means ``m_s`` of the new batches are learned with the batch
        covariate weights; everything else stays as in the reference (see
        :meth:`scvi.model.base.ArchesMixin.load_query_data` for the freezing arguments).
        """
        if adata is not None:
            if isinstance(reference_model, str):
                var_names = cls.prepare_query_anndata(adata, reference_model, return_reference_var_names=True)
            else:
                var_names = reference_model.adata.var_names
            unseen = adata.var_names.difference(var_names)
            if len(unseen):
                raise ValueError(
                    f"adata holds {len(unseen)} gene(s) the reference model has not seen "
                    f"(e.g. {', '.join(map(str, unseen[:5]))}); subset or pad the query with "
                    "FADVI.prepare_query_anndata(adata, reference_model) first."
                )
            if not adata.var_names.equals(pd.Index(var_names)):
                raise ValueError(
                    "adata's genes differ from the reference model's genes (missing or reordered); "
                    "run FADVI.prepare_query_anndata(adata, reference_model) first."
                )
        model = super().load_query_data(adata, reference_model, **kwargs)
        if not kwargs.get("unfrozen", False):
            n_ref = (
                reference_model.module.prior_mean_b.shape[1] if not isinstance(reference_model, str) else None
            )
            prior = model.module.prior_mean_b
            prior.requires_grad = True
            if n_ref is None:
                n_ref = prior.shape[1] - len(
                    set(model._code_to_batch) - set(_reference_batches(reference_model))
                )

            def _only_new(grad, n_ref=n_ref):
                g = grad.clone()
                g[:, :n_ref] = 0
                return g

            prior.register_hook(_only_new)
            if not kwargs.get("freeze_classifier", True):
                for p in model.module.heads.parameters():
                    p.requires_grad = True
        return model


def _reference_batches(path: str) -> list:
    from scvi.model.base._save_load import _load_saved_files

    attr_dict, *_ = _load_saved_files(path, load_adata=False)
    return list(
        attr_dict["registry_"]["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"][
            "categorical_mapping"
        ]
    )
