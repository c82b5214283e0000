"""User API of AMICI: set-up, training and read-outs (no mathematics here; see ``_module.py``)."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model._utils import use_distributed_sampler
from scvi.model.base import BaseModelClass, VAEMixin
from scvi.model.base._base_model import _SETUP_ARGS_KEY
from scvi.utils import track

from cellvi._base import RegistryMixin
from cellvi._io import atomic_path
from cellvi._training import EpochMetricsTrainingPlan, TrainRunner
from cellvi._validation import (
    check_layer,
    check_obs_key,
    check_positive_int,
    check_probability,
    get_matrix,
    iter_row_chunks,
    layer_arg,
)

from ._constants import AMICI_KEYS as KEYS
from ._data import NeighborBatches, NeighborStore, SpatialDataSplitter, other_type_neighbors
from ._module import AMICIModule

logger = logging.getLogger(__name__)

#: Optimiser settings that differ from scvi-tools' TrainingPlan defaults (the original kept eps=0.01,
#: with which the model barely moves in tens of epochs; see the class docstring).
DEFAULT_PLAN_KWARGS = {"lr": 1e-3, "eps": 1e-8, "weight_decay": 1e-6}


class _ArrayObsmField(ObsmField):
    """``ObsmField`` for plain arrays: columns numbered 0..d-1 without an INFO line per field and call.

    scvi-tools logs "Generating sequential column names" for each of AMICI's three obsm arrays on every
    set-up and transfer (coordinates and neighbour tables have no column names to keep).
    """

    def _setup_column_names(self, adata):
        data = self.get_field_data(adata)
        if self.colnames_uns_key is None and not isinstance(data, pd.DataFrame):
            return np.arange(data.shape[1])
        return super()._setup_column_names(adata)


class AMICI(RegistryMixin, VAEMixin, BaseModelClass):
    """Attention Mechanism Interpretation of Cell-cell Interactions (AMICI) on spatial transcriptomics.

    Each receiver cell's expression (log-normalised) is predicted as its cell type's mean profile plus a
    residual computed by cross-attention from the receiver's *type* to the expression of its ``K`` nearest
    spatial neighbours of *other* types, with a learned per-head exponential distance kernel and a dummy
    "no interaction" key. Re-implemented from the mathematics of Hong et al. (bioRxiv 2025) on scvi-tools.

    Parameters
    ----------
    adata
        AnnData object that has been registered via :meth:`~cellvi.AMICI.setup_anndata`.
    **model_kwargs
        Keyword args for :class:`~cellvi.amici.AMICIModule` (``n_heads``, ``n_head_size``,
        ``n_nn_embed``, ``n_nn_embed_hidden``, ``attention_dummy_score``, ``neighbor_dropout``,
        ``attention_penalty_coef``, ``value_l1_penalty_coef``, ...).

    Notes
    -----
    Differences from ``amici-st`` 0.1.0, on purpose:

    * The module defaults are the paper's settings (8 heads of size 32, ``n_nn_embed_hidden=512``), and
      :meth:`train` uses Adam with ``eps=1e-8`` (the original inherits scvi's ``eps=0.01``, with which the
      model learns almost nothing in tens of epochs). Pass ``plan_kwargs={"eps": 0.01}`` for the original.
    * The residual is additive over heads, so :meth:`get_gene_residual_contributions` is exact.
    * The cell-type mean profiles are computed from the training cells only (when :meth:`train` splits the
      data), are stored as (C, G) whatever the sparsity of ``X``, and dense and sparse data are
      interchangeable after :meth:`load`.
    * The penalties are not part of the reconstruction loss or ELBO, so early stopping (on
      ``elbo_validation``) is not inflated by :class:`~cellvi.amici.AttentionPenaltyMonitor`.
    * Training runs on cellvi's shared data path (:mod:`cellvi.dataloaders`): expression and neighbour
      tables are held once as tensors on the training device and each minibatch gathers its receivers and
      the rows of its *unique* neighbour cells by index; per-neighbour features are computed once per unique
      neighbour cell; no scvi-tools class is patched. ``strategy="ddp"`` works: each process holds the
      whole tissue and iterates its share of every minibatch.
    * There is no latent variable: :meth:`get_latent_representation` and :meth:`get_marginal_ll` raise a
      :class:`TypeError` saying so; :meth:`get_nn_embed` gives a per-cell embedding.

    Train on one region and evaluate on the whole tissue: run :meth:`setup_anndata` on the region's AnnData,
    train, then pass the whole tissue's AnnData to any ``get_*`` method; its neighbours (over the whole
    tissue) are computed with the model's set-up arguments if they are missing (written to its ``obsm``).

    Examples
    --------
    >>> import logging, cellvi, scvi
    >>> scvi.settings.verbosity = logging.WARNING  # quieter set-up messages
    >>> adata = cellvi.data.simulate_spatial(n_cells=400, n_genes=50, seed=0)
    >>> cellvi.AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=10)
    >>> model = cellvi.AMICI(adata, n_heads=2, n_head_size=8, n_nn_embed=32, n_nn_embed_hidden=32)
    >>> model.train(max_epochs=2, enable_progress_bar=False)
    >>> model.get_predictions(prog_bar=False).shape
    (400, 50)
    """

    _data_splitter_cls = SpatialDataSplitter
    _training_plan_cls = EpochMetricsTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(self, adata=None, **model_kwargs):
        super().__init__(adata)
        allowed = set(inspect.signature(AMICIModule.__init__).parameters) - {
            "self",
            "n_genes",
            "n_labels",
            "ct_profiles",
        }
        unknown = sorted(set(model_kwargs) - allowed)
        if unknown:
            raise ValueError(f"Unknown model_kwargs {unknown}; expected some of {sorted(allowed)}.")
        store = self._store(self.adata)
        n_labels = self.summary_stats.n_labels
        self.module = AMICIModule(
            n_genes=self.summary_stats.n_vars,
            n_labels=n_labels,
            ct_profiles=store.type_means(None, n_labels),
            **model_kwargs,
        )
        self._model_summary_string = (
            f"AMICI model with {self.module.n_heads} heads of size {self.module.n_head_size}, "
            f"{n_labels} cell types, {self.summary_stats.n_vars} genes, "
            f"{store.nn_idx.shape[1]} neighbours per cell."
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        labels_key: str | None = None,
        coord_obsm_key: str | None = None,
        nn_dist_key: str = "_nn_dist",
        nn_idx_key: str = "_nn_idx",
        cell_radius_key: str | None = None,
        n_neighbors: int | None = None,
        **kwargs,
    ):
        """Sets up the AnnData object for this model.

        Computes each cell's ``n_neighbors`` nearest cells of *another* cell type from the coordinates
        (one KD-tree per type) and writes them to ``adata.obsm[nn_idx_key]`` (row indices) and
        ``adata.obsm[nn_dist_key]`` (distances, ascending), and ``n_neighbors`` to
        ``adata.uns["n_neighbors"]``; nothing else in ``adata`` is modified. Then registers the expression,
        labels, coordinates and neighbour tables.

        Parameters
        ----------
        adata
            AnnData object; cells x genes, expression log-normalised (e.g. ``sc.pp.normalize_total`` then
            ``sc.pp.log1p``), dense or sparse.
        layer
            If not None, uses this as the key in ``adata.layers`` for the expression (else ``adata.X``).
        labels_key
            Key in ``adata.obs`` for the cell types (required).
        coord_obsm_key
            Key in ``adata.obsm`` for the spatial coordinates, shape (n_obs, d) (required).
        nn_dist_key
            Key in ``adata.obsm`` where the neighbour distances are written.
        nn_idx_key
            Key in ``adata.obsm`` where the neighbour row indices are written.
        cell_radius_key
            Optional key in ``adata.obs`` with each cell's radius; distances become surface distances
            ``max(d_ij - r_i - r_j, 0)``.
        n_neighbors
            Neighbours per cell; if None, ``adata.uns["n_neighbors"]`` if present, else 30.
        **kwargs
            Passed to :meth:`~scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.is_view:
            raise ValueError(
                "adata is a view (e.g. adata[mask]); pass adata[mask].copy(): set-up writes to adata.obsm."
            )
        if labels_key is None:
            raise ValueError("labels_key is required: the adata.obs column holding the cell types.")
        check_obs_key(adata, labels_key, "labels_key")
        check_layer(adata, layer)
        if coord_obsm_key is None or coord_obsm_key not in adata.obsm:
            have = ", ".join(map(repr, adata.obsm.keys())) or "none"
            raise ValueError(
                f"coord_obsm_key={coord_obsm_key!r} is not a key of adata.obsm; expected the spatial "
                f"coordinates (n_obs, 2); available: {have}."
            )
        for arg, key in (("nn_dist_key", nn_dist_key), ("nn_idx_key", nn_idx_key)):
            if not isinstance(key, str) or not key or key == coord_obsm_key:
                raise ValueError(
                    f"{arg} must be a non-empty string different from coord_obsm_key, got {key!r}."
                )
        if nn_dist_key == nn_idx_key:
            raise ValueError(f"nn_dist_key and nn_idx_key must differ, both are {nn_idx_key!r}.")
        coords = np.asarray(adata.obsm[coord_obsm_key], dtype=np.float64)
        if coords.ndim != 2 or coords.shape[0] != adata.n_obs or not np.all(np.isfinite(coords)):
            raise ValueError(
                f"adata.obsm[{coord_obsm_key!r}] must be a finite (n_obs, d) array of coordinates, "
                f"got shape {coords.shape}{'' if np.all(np.isfinite(coords)) else ' with NaN/inf'}."
            )
        radius = None
        if cell_radius_key is not None:
            check_obs_key(adata, cell_radius_key, "cell_radius_key")
            radius = pd.to_numeric(adata.obs[cell_radius_key], errors="coerce").to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(radius)) or radius.min() < 0:
                raise ValueError(f"cell_radius_key={cell_radius_key!r}: radii must be finite numbers >= 0.")
        if n_neighbors is None:
            n_neighbors = adata.uns.get("n_neighbors", 30)
        n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
        X = get_matrix(adata, layer)
        _check_finite(X, layer_arg(layer))

        labels = pd.Categorical(adata.obs[labels_key])
        nn_idx, nn_dist = other_type_neighbors(
            coords, labels.codes, n_neighbors, radius=radius, label_names=list(labels.categories)
        )
        adata.obsm[nn_idx_key] = nn_idx
        adata.obsm[nn_dist_key] = nn_dist
        adata.uns["n_neighbors"] = n_neighbors
        setup_method_args[_SETUP_ARGS_KEY]["n_neighbors"] = n_neighbors

        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            _ArrayObsmField(KEYS.COORDS, coord_obsm_key),
            _ArrayObsmField(KEYS.NN_IDX, nn_idx_key),
            _ArrayObsmField(KEYS.NN_DIST, nn_dist_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """Validate ``adata``; compute its neighbour tables with the model's set-up arguments if missing."""
        if adata is not None and self.get_anndata_manager(adata) is None:
            args = (
                self.registry_[_SETUP_ARGS_KEY]
                if self.adata_manager is None
                else self.adata_manager.registry[_SETUP_ARGS_KEY]
            )
            if args["nn_idx_key"] not in adata.obsm or args["nn_dist_key"] not in adata.obsm:
                if adata.is_view:
                    raise ValueError(
                        "adata is a view; pass adata.copy() (its neighbour tables must be written)."
                    )
                self.__class__.setup_anndata(adata, **args)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _store(self, adata) -> NeighborStore:
        manager = self.get_anndata_manager(adata, required=True)
        return NeighborStore(
            manager.get_from_registry(REGISTRY_KEYS.X_KEY),
            manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY),
            manager.get_from_registry(KEYS.NN_IDX),
            manager.get_from_registry(KEYS.NN_DIST),
            device=self.device if hasattr(self, "module") else "cpu",
        )

    def _make_data_loader(
        self, adata, indices=None, batch_size=None, shuffle=False, data_loader_class=None, **kwargs
    ):
        """Gathered minibatches (receivers and their neighbours) of ``indices`` of ``adata``, in order."""
        if shuffle:
            raise ValueError("AMICI inference loaders iterate in order; shuffle=True is not supported here.")
        return NeighborBatches(self._store(adata), indices, batch_size or settings.batch_size)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        external_indexing: list[np.ndarray] | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        use_wandb: bool = False,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        wandb_run_name: str | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model.

        Minibatches are shuffled cells. ``datasplitter_kwargs={"patch_size": p}`` makes them of spatially
        compact patches of ``p`` cells from random places of the tissue (see
        :class:`~cellvi.amici._data.SpatialPatchSampler`): their receivers share neighbours, so the
        per-neighbour networks run on 2-4x fewer cells per step, at the price of correlated minibatches
        (slower early training in our runs). With ``strategy="ddp"`` every process holds the whole
        expression matrix and neighbour tables and iterates its share of every minibatch (``batch_size`` is
        per process).

        Parameters
        ----------
        max_epochs
            Number of passes through the dataset. If None, defaults to
            ``np.min([round((20000 / n_cells) * 400), 400])``.
        accelerator
            Supports passing different accelerator types ("cpu", "gpu", "tpu", "ipu", "hpu", "mps", "auto")
            as well as custom accelerator instances.
        devices
            The devices to use. Can be set to a non-negative index (int or str), a sequence of device indices
            (list or comma-separated str), the value -1 to indicate all available devices, or "auto" for
            automatic selection based on the chosen accelerator.
        train_size
            Size of training set in the range [0.0, 1.0].
        validation_size
            Size of the test set. If None, defaults to 1 - train_size. If train_size + validation_size < 1,
            the remaining cells belong to a test set.
        external_indexing
            A list of data split indices in the order of training, validation, and test sets. Validation and
            test set are not required and can be left empty.
        shuffle_set_split
            Whether to shuffle indices before splitting. If False, the val, train, and test set are split in
            the sequential order of the data according to validation_size and train_size percentages.
        batch_size
            Minibatch size to use during training.
        early_stopping
            Perform early stopping (on ``elbo_validation``, which here is the held-out reconstruction loss,
            without the penalties). Additional arguments can be passed in ``**trainer_kwargs``.
        plan_kwargs
            Keyword args for :class:`~cellvi._training.EpochMetricsTrainingPlan` (scvi-tools'
            :class:`~scvi.train.TrainingPlan` with metrics logged once per epoch and fused Adam); defaults
            ``lr=1e-3, eps=1e-8, weight_decay=1e-6``.
        use_wandb
            Log to Weights & Biases through Lightning's ``WandbLogger`` (needs the ``wandb`` package); any
            Lightning logger can instead be passed as ``logger=``.
        wandb_project, wandb_entity, wandb_run_name
            Passed to ``WandbLogger`` (``project``, ``entity``, ``name``).
        datasplitter_kwargs
            Keyword args for :class:`~cellvi.amici._data.SpatialDataSplitter`: ``patch_size`` (cells per
            spatial patch; default 1: random minibatches), ``data_path`` (``"auto"``, ``"device"``:
            expression on the training device, ``"stream"``: on the CPU, minibatches copied), ``seed``.
        **trainer_kwargs
            Other keyword args for :class:`~scvi.train.Trainer` (e.g. ``enable_progress_bar=False``,
            ``callbacks=[AttentionPenaltyMonitor()]``, ``logger=...``).
        """
        n_cells = self.adata.n_obs
        if max_epochs is None:
            max_epochs = int(np.min([round((20000 / n_cells) * 400), 400]))
        max_epochs = check_positive_int(max_epochs, "max_epochs")
        batch_size = check_positive_int(batch_size, "batch_size")
        check_probability(train_size, "train_size")
        if use_wandb:
            if "logger" in trainer_kwargs:
                raise ValueError("pass either use_wandb=True or logger=..., not both.")
            try:
                from lightning.pytorch.loggers import WandbLogger

                trainer_kwargs["logger"] = WandbLogger(
                    project=wandb_project, entity=wandb_entity, name=wandb_run_name
                )
            except ModuleNotFoundError as err:
                raise ValueError("use_wandb=True needs the 'wandb' package (pip install wandb).") from err

        store = self._store(self.adata)
        splitter_kwargs = dict(datasplitter_kwargs or {})
        if "strategy" in trainer_kwargs and use_distributed_sampler(trainer_kwargs["strategy"]):
            splitter_kwargs.setdefault("distributed_sampler", True)
        splitter = self._data_splitter_cls(
            self.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            external_indexing=external_indexing,
            batch_size=batch_size,
            **splitter_kwargs,
        )
        # cell-type means from the training cells only (types absent from them keep all-cell means)
        splitter.setup()
        n_labels = self.summary_stats.n_labels
        train_means = store.type_means(splitter.train_idx, n_labels)
        present = (
            np.bincount(store.labels[torch.as_tensor(splitter.train_idx)].cpu().numpy(), minlength=n_labels)
            > 0
        )
        all_means = store.type_means(None, n_labels)
        profiles = torch.where(torch.as_tensor(present)[:, None], train_means, all_means)
        self.module.ct_profiles.copy_(profiles.to(self.module.ct_profiles.device))

        plan_kwargs = {**DEFAULT_PLAN_KWARGS, **(plan_kwargs or {})}
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        runner = self._train_runner_cls(
            self,
            training_plan=training_plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            **trainer_kwargs,
        )
        return runner()

    # ------------------------------------------------------------------ read-outs
    def _batches(self, adata, indices, batch_size):
        adata = self._validate_anndata(adata)
        self.module.eval()
        return adata, self._make_data_loader(adata, indices, batch_size)

    @torch.inference_mode()
    def get_predictions(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        get_residuals: bool = False,
        prog_bar: bool = True,
    ) -> np.ndarray:
        """Predicted expression (cell-type mean plus the neighbour residual) of each cell.

        Parameters
        ----------
        adata
            AnnData object with the same genes and cell types as the model's; its neighbours are computed if
            missing. If None, the model's AnnData.
        indices
            Indices of the cells to predict; all cells if None.
        batch_size
            Minibatch size; ``scvi.settings.batch_size`` if None.
        get_residuals
            Return only the residual (prediction minus the cell-type mean profile).
        prog_bar
            Show a progress bar.

        Returns
        -------
        (n_cells, n_genes) float32 array, rows in the order of ``indices``.
        """
        adata, loader = self._batches(adata, indices, batch_size)
        key = KEYS.RESIDUAL if get_residuals else KEYS.PREDICTION
        out = [
            self.module(t, compute_loss=False)[1][key].cpu().numpy()
            for t in track(loader, description="AMICI predictions", disable=not prog_bar)
        ]
        return np.concatenate(out, axis=0) if out else np.empty((0, self.summary_stats.n_vars), np.float32)

    @torch.inference_mode()
    def get_nn_embed(
        self, adata=None, indices: Sequence[int] | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Neighbour embedding ``u`` of each cell (what the keys, values and distance kernel read).

        Parameters
        ----------
        adata
            AnnData object set up like the model's; if None, the model's AnnData.
        indices
            Indices of the cells; all cells if None.
        batch_size
            Minibatch size; ``scvi.settings.batch_size`` if None.

        Returns
        -------
        (n_cells, n_nn_embed) float32 array.
        """
        adata, loader = self._batches(adata, indices, batch_size)
        out = [self.module.embed_neighbors(t[KEYS.X]).cpu().numpy() for t in loader]
        return np.concatenate(out, axis=0)

    @torch.inference_mode()
    def get_gene_residual_contributions(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        head_idxs: Sequence[int] | None = None,
    ) -> pd.DataFrame:
        """Get the gene residual contributions for each cell at full attention.

        Compute the gene-wise residual contributions for each cell irrespective of the attention score for the
        head. As the value vectors do not depend on the distances or the index cell, we only need to provide
        the neighbor gene expressions. In cellvi the residual is additive over heads and neighbours, so a
        neighbour with attention weight ``a`` in head ``h`` adds exactly ``a`` times its row here.

        Parameters
        ----------
        adata
            The AnnData object.
        indices
            The indices of the cells to get gene residual contributions for.
        batch_size
            The batch size.
        head_idxs
            The indices of the heads to get gene residual contributions for.

        Returns
        -------
        pd.DataFrame: one row per (cell, head), with the columns ``neighbor`` (the cell's obs_name), ``head``
        (int) and one float column per gene.
        """
        H = self.module.n_heads
        heads = np.arange(H) if head_idxs is None else np.asarray(head_idxs, dtype=np.int64).reshape(-1)
        if heads.size == 0 or heads.min() < 0 or heads.max() >= H:
            raise ValueError(f"head_idxs must be head indices in 0..{H - 1}, got {head_idxs!r}.")
        adata, loader = self._batches(adata, indices, batch_size)
        head_t = torch.as_tensor(heads, device=self.module.head_out.device)
        parts = [self.module.value_contributions(t[KEYS.X])[:, head_t].cpu().numpy() for t in loader]
        contrib = np.concatenate(parts, axis=0)  # (n, h, G)
        names = (
            adata.obs_names.to_numpy() if indices is None else adata.obs_names.to_numpy()[np.asarray(indices)]
        )
        df = pd.DataFrame(contrib.reshape(-1, contrib.shape[-1]), columns=adata.var_names)
        df.insert(0, "head", np.tile(heads, len(names)))
        df.insert(0, "neighbor", np.repeat(names, len(heads)))
        return df

    # ------------------------------------------------------------------ interpretation (cellvi.interpretation)
    def get_attention_patterns(
        self, adata=None, indices=None, batch_size=None, flavor="vanilla", prog_bar=True, **kwargs
    ):
        """Different flavors of attention patterns; see :class:`cellvi.interpretation.AMICIAttentionModule`.

        Parameters
        ----------
        adata
            AnnData object to get attention patterns from.
        indices
            Indices of the cells to get attention patterns from.
        batch_size
            Batch size to use for the data loader.
        flavor
            ``"vanilla"``, ``"value-weighted"``, ``"info-weighted"`` or ``"gene-weighted"``.
        prog_bar
            Whether to show a progress bar.
        **kwargs
            Further arguments of the interpretation module's ``compute``.
        """
        from cellvi.interpretation import _model_methods

        return _model_methods.get_attention_patterns(
            self,
            adata=adata,
            indices=indices,
            batch_size=batch_size,
            flavor=flavor,
            prog_bar=prog_bar,
            **kwargs,
        )

    def get_counterfactual_attention_patterns(
        self, cell_type, adata=None, indices=None, head_idxs=None, batch_size=None, **kwargs
    ):
        """Counterfactual attention of a receiver type; see :class:`cellvi.interpretation.AMICICounterfactualAttentionModule`.

        Parameters
        ----------
        cell_type
            The index cell type to get counterfactual attention scores for.
        adata
            Optional AnnData object to use. If None, uses model.adata.
        indices
            Optional list of cell indices to get scores for. If None, uses all cells.
        head_idxs
            Optional list of attention head indices to get scores for. If None, uses all heads.
        batch_size
            Optional batch size to use for the data loader.
        **kwargs
            Further arguments of the interpretation module's ``compute``.
        """
        from cellvi.interpretation import _model_methods

        return _model_methods.get_counterfactual_attention_patterns(
            self,
            cell_type,
            adata=adata,
            indices=indices,
            head_idxs=head_idxs,
            batch_size=batch_size,
            **kwargs,
        )

    def get_expl_variance_scores(
        self, adata=None, alpha=0.05, run_permutation_test=True, n_permutations=None, **kwargs
    ):
        """Explained variance per head and cell type; see :class:`cellvi.interpretation.AMICIExplainedVarianceModule`.

        Parameters
        ----------
        adata
            The AnnData object.
        alpha
            The desired significance level for the explained variance of each head-cell type pair via
            permutation testing.
        run_permutation_test
            Whether to run the permutation test.
        n_permutations
            The number of permutations to use for the permutation test. If not provided, the minimum number of
            permutations required to achieve a significance level of alpha will be used.
        **kwargs
            Further arguments of the interpretation module's ``compute``.
        """
        from cellvi.interpretation import _model_methods

        return _model_methods.get_expl_variance_scores(
            self, adata=adata, alpha=alpha, run_permutation_test=run_permutation_test, n_permutations=n_permutations,
            **kwargs,
        )  # fmt: skip

    def get_neighbor_ablation_scores(
        self,
        cell_type=None,
        head_idx=None,
        adata=None,
        ablated_neighbor_ct_sub=None,
        ablated_neighbor_indices=None,
        compute_z_value=False,
        **kwargs,
    ):
        """Change in prediction error when ablating neighbour cell types; see :class:`cellvi.interpretation.AMICIAblationModule`.

        Parameters
        ----------
        cell_type
            The cell type to compute the residuals for. None indicates using all cell types.
        head_idx
            The index of the head to test. None indicates using all heads.
        adata
            The AnnData object.
        ablated_neighbor_ct_sub
            The neighbor cell types to ablate.
        ablated_neighbor_indices
            The indices of the neighbor cells to ablate.
        compute_z_value
            Whether to save the z-value using the correlation coefficient or not.
        **kwargs
            Further arguments of the interpretation module's ``compute``.
        """
        from cellvi.interpretation import _model_methods

        return _model_methods.get_neighbor_ablation_scores(
            self, cell_type=cell_type, head_idx=head_idx, adata=adata, ablated_neighbor_ct_sub=ablated_neighbor_ct_sub,
            ablated_neighbor_indices=ablated_neighbor_indices, compute_z_value=compute_z_value, **kwargs,
        )  # fmt: skip

    def get_latent_representation(self, *args, **kwargs):
        """AMICI has no latent variable; raises :class:`TypeError` (use :meth:`get_nn_embed`)."""
        raise TypeError(
            "AMICI has no latent variable, so there is no latent representation; use get_nn_embed() for a "
            "per-cell embedding or get_predictions() for the model's output."
        )

    def get_marginal_ll(self, *args, **kwargs):
        """AMICI has no latent variable; raises :class:`TypeError` (use :meth:`get_reconstruction_error`)."""
        raise TypeError(
            "AMICI has no latent variable, so its marginal likelihood is its reconstruction likelihood; use "
            "get_reconstruction_error() (or get_elbo(), identical for this model)."
        )

    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the state of the model (atomically: a failed save leaves ``dir_path`` as it was).

        Parameters
        ----------
        dir_path
            Path to a directory.
        prefix
            Prefix to prepend to saved file names.
        overwrite
            Overwrite existing data or not. If False and directory already exists at dir_path, error will be
            raised.
        save_anndata
            If True, also saves the anndata.
        save_kwargs
            Keyword arguments passed into :func:`torch.save`.
        legacy_mudata_format
            Passed to scvi-tools' ``save`` (MuData only).
        **anndata_write_kwargs
            Kwargs for :meth:`~anndata.AnnData.write`.
        """
        if os.path.exists(dir_path) and not overwrite:
            raise ValueError(f"{dir_path} already exists; pass overwrite=True or another directory.")
        with atomic_path(dir_path, overwrite=True) as tmp:
            super().save(
                str(tmp),
                prefix=prefix,
                overwrite=True,
                save_anndata=save_anndata,
                save_kwargs=save_kwargs,
                legacy_mudata_format=legacy_mudata_format,
                **anndata_write_kwargs,
            )


def _check_finite(X, arg: str) -> None:
    from scipy import sparse

    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{arg} is empty (shape {X.shape}); expected cells x genes.")
    for start, block in iter_row_chunks(X):
        v = block.data if sparse.issparse(block) else np.asarray(block)
        if not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"{arg} has dtype {v.dtype}; expected numeric log-normalised expression.")
        if not np.all(np.isfinite(v)):
            raise ValueError(
                f"{arg} contains NaN or infinite values (in rows {start}..{start + block.shape[0] - 1})."
            )
