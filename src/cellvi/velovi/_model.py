"""``cellvi.VELOVI``: the user API of veloVI (RNA velocity by variational inference)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.module._constants import MODULE_KEYS

from cellvi._base import RegistryMixin
from cellvi._validation import check_counts, check_layer, check_obs_key, check_positive_int, row_sums
from cellvi.dataloaders import DATA_PATH_DOC, DataSplitter, make_data_loader

from .._training import TrainRunner
from ._constants import STATE_NAMES, VELOVI_REGISTRY_KEYS
from ._module import VELOVAE
from ._stats import (
    directional_statistics,
    group_ttests,
    permute_within_groups,
    sample_group_rows,
    switch_estimates,
)
from ._training import VELOVITrainingPlan

logger = logging.getLogger(__name__)

_MIN_TRAIN_CELLS = 3
_SAMPLE_BLOCK = 1 << 24  # elements of one (samples x cells x genes) block kept on the device
_CACHE_BLOCK = 1 << 17  # (samples x cells x genes) elements of a minibatch whose passes stay in cache


def _softplus_inverse(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 20, x, np.log(np.expm1(np.minimum(x, 20))))


class VELOVI(RegistryMixin, VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Velocity Variational Inference :cite:p:`GayosoWeiler23`.

    Each gene follows switching transcription kinetics (induction, its steady state, repression, its steady
    state); a cell's latent variable decodes, per gene, the probabilities of the four states and the cell's
    position along them. Train on kNN-smoothed, min-max-scaled spliced/unspliced abundances (see
    :func:`cellvi.velovi.preprocess_data`).

    Parameters
    ----------
    adata
        AnnData object that has been registered via :meth:`~cellvi.VELOVI.setup_anndata`.
    n_hidden
        Number of nodes per hidden layer.
    n_latent
        Dimensionality of the latent space.
    n_layers
        Number of hidden layers used for encoder and decoder NNs.
    dropout_rate
        Dropout rate for neural networks.
    gamma_init_data
        Initialize gamma using the data-driven technique.
    linear_decoder
        Use a linear decoder from latent space to time.
    **model_kwargs
        Keyword args for :class:`~cellvi.velovi.VELOVAE`

    Examples
    --------
    >>> import cellvi
    >>> adata = cellvi.data.simulate_velocity(n_obs=200, n_vars=10, seed=0)
    >>> adata = cellvi.velovi.preprocess_data(cellvi.velovi.compute_moments(adata, n_neighbors=10),
    ...                                       filter_on_r2=False)
    >>> cellvi.VELOVI.setup_anndata(adata, spliced_layer="Ms", unspliced_layer="Mu")
    >>> model = cellvi.VELOVI(adata)
    >>> model.train(max_epochs=5, enable_progress_bar=False)
    >>> model.get_velocity().shape
    (200, 10)
    """

    _module_cls = VELOVAE
    _data_loader_cls = staticmethod(make_data_loader)

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 256,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gamma_init_data: bool = False,
        linear_decoder: bool = False,
        **model_kwargs,
    ):
        super().__init__(adata)
        self.n_latent = n_latent
        spliced = self.adata_manager.get_from_registry(VELOVI_REGISTRY_KEYS.X_KEY)
        unspliced = self.adata_manager.get_from_registry(VELOVI_REGISTRY_KEYS.U_KEY)
        s_upper, u_upper = switch_estimates(spliced, unspliced)

        # a gene without unspliced signal would get alpha = softplus(-inf) = 0 with no gradient
        alpha_unconstr = _softplus_inverse(np.maximum(u_upper, 1e-3))
        gamma_unconstr = None
        if gamma_init_data:
            ratio = np.divide(u_upper, s_upper, out=np.full_like(u_upper, np.nan), where=s_upper > 0)
            default = -1.0  # softplus(-1) = 0.31, the data-free initial value
            gamma_unconstr = np.where(
                np.isfinite(ratio) & (ratio > 0),
                np.minimum(_softplus_inverse(np.where(ratio > 0, ratio, 1.0)), 10.0),
                default,
            )
        self.module = self._module_cls(
            n_input=self.summary_stats["n_vars"],
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            gamma_unconstr_init=gamma_unconstr,
            alpha_unconstr_init=alpha_unconstr,
            switch_spliced=s_upper,
            switch_unspliced=u_upper,
            linear_decoder=linear_decoder,
            **model_kwargs,
        )
        self._model_summary_string = (
            f"VELOVI Model with the following params: \nn_hidden: {n_hidden}, n_latent: {n_latent}, "
            f"n_layers: {n_layers}, dropout_rate: {dropout_rate}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup and training
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        spliced_layer: str,
        unspliced_layer: str,
        **kwargs,
    ) -> AnnData | None:
        """Sets up the AnnData object for this model.

        A mapping will be created between data fields used by this model to their respective locations in
        adata. None of the data in adata are modified. Only adds fields to adata.

        Parameters
        ----------
        adata
            AnnData object. Rows represent cells, columns represent features.
        spliced_layer
            Layer in adata with spliced normalized expression.
        unspliced_layer
            Layer in adata with unspliced normalized expression.

        Returns
        -------
        None. Adds the following fields:

        .uns['_scvi']
            scvi setup dictionary

        Raises
        ------
        ValueError
            If a layer is missing, holds negative, NaN or infinite values, or a gene is zero in both layers.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        for arg, layer in (("spliced_layer", spliced_layer), ("unspliced_layer", unspliced_layer)):
            if not isinstance(layer, str):
                raise ValueError(f"{arg} must be the name of a layer in adata.layers, got {layer!r}.")  # noqa: TRY004
            check_layer(adata, layer, arg)
            check_counts(adata.layers[layer], f"adata.layers[{layer!r}] ({arg})", integer=False)
        totals = _column_sums(adata.layers[spliced_layer]) + _column_sums(adata.layers[unspliced_layer])
        empty = np.flatnonzero(totals <= 0)
        if empty.size:
            names = ", ".join(map(str, adata.var_names[empty[:5]]))
            more = f" and {empty.size - 5} more" if empty.size > 5 else ""
            raise ValueError(
                f"{empty.size} gene(s) are zero in both adata.layers[{spliced_layer!r}] and "
                f"adata.layers[{unspliced_layer!r}] ({names}{more}); remove them first "
                "(cellvi.velovi.preprocess_data does)."
            )
        anndata_fields = [
            LayerField(VELOVI_REGISTRY_KEYS.X_KEY, spliced_layer, is_count_data=False),
            LayerField(VELOVI_REGISTRY_KEYS.U_KEY, unspliced_layer, is_count_data=False),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def train(
        self,
        max_epochs: int | None = 500,
        lr: float = 1e-2,
        weight_decay: float = 1e-2,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int = 256,
        early_stopping: bool = True,
        gradient_clip_val: float = 10,
        plan_kwargs: dict | None = None,
        external_indexing: list[np.ndarray] | None = None,
        data_path: str = "auto",
        **trainer_kwargs,
    ):
        """Train the model.

        The KL weight rises linearly from 0 to 1 over ``plan_kwargs['n_epochs_kl_warmup']`` epochs (400 by
        default) while the switch penalty fades out. Two fixes over the original make warm-up and early
        stopping work together: the warm-up is shortened to at most 80% of ``max_epochs``, and early stopping
        only starts counting once the warm-up is over (``early_stopping_warmup_epochs``), so training never
        stops with the penalty still on.

        Parameters
        ----------
        max_epochs
            Number of passes through the dataset. If ``None``, defaults to
            ``np.min([round((20000 / n_cells) * 400), 400])``
        lr
            Learning rate for optimization.
        weight_decay
            Weight decay for optimization.
        accelerator
            Supports passing different accelerator types ("cpu", "gpu", "tpu", "ipu", "hpu", "mps", "auto")
            as well as custom accelerator instances.
        devices
            The devices to use. Can be set to a non-negative index (int or str), a sequence of device indices
            (list or comma-separated str), the value -1 to indicate all available devices, or "auto" for
            automatic selection based on the chosen accelerator.
        train_size
            Size of the training set in the range ``[0.0, 1.0]``.
        validation_size
            Size of the test set. If ``None``, defaults to ``1 - train_size``. If
            ``train_size + validation_size < 1``, the remaining cells belong to a test set.
        batch_size
            Minibatch size to use during training. Data sets with fewer cells train in one minibatch.
        early_stopping
            Perform early stopping. Additional arguments can be passed in ``**kwargs``.
            See :class:`~scvi.train.Trainer` for further options.
        gradient_clip_val
            Value for gradient clipping.
        plan_kwargs
            Keyword args for :class:`~cellvi.velovi.VELOVITrainingPlan` (a :class:`~scvi.train.TrainingPlan`). Keyword arguments passed to this method will
            overwrite values present in ``plan_kwargs``, when appropriate.
        external_indexing
            A list of data split indices in the order of training, validation, and test sets.
            Validation and test set are not required and can be left empty.
        data_path
            How minibatches reach the model (cellvi's shared data path, :mod:`cellvi.dataloaders`); see below.
        **trainer_kwargs
            Other keyword args for :class:`~scvi.train.Trainer`.
        """
        n_cells = self.adata.n_obs
        if n_cells < _MIN_TRAIN_CELLS:
            raise ValueError(
                f"adata has {n_cells} cell(s); VELOVI needs at least {_MIN_TRAIN_CELLS} to train "
                "(batch normalisation needs more than one cell per minibatch)."
            )
        check_positive_int(batch_size, "batch_size", minimum=2)
        if max_epochs is None:
            max_epochs = int(np.min([round((20000 / n_cells) * 400), 400]))
        check_positive_int(max_epochs, "max_epochs")

        plan_kwargs = dict(plan_kwargs or {})
        plan_kwargs = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", **plan_kwargs}
        n_train = n_cells if train_size is None and external_indexing is None else None
        n_batches = math.ceil((n_train or n_cells) / batch_size)
        cap = max(1, int(0.8 * max_epochs))
        steps = plan_kwargs.get("n_steps_kl_warmup")
        if steps is not None:
            plan_kwargs["n_steps_kl_warmup"] = min(int(steps), cap * n_batches)
            plan_kwargs["n_epochs_kl_warmup"] = None
            warmup_epochs = math.ceil(plan_kwargs["n_steps_kl_warmup"] / n_batches)
        else:
            epochs = plan_kwargs.get("n_epochs_kl_warmup", 400)
            warmup_epochs = 0 if epochs is None else min(int(epochs), cap)
            plan_kwargs["n_epochs_kl_warmup"] = warmup_epochs or None

        trainer_kwargs = {"gradient_clip_val": gradient_clip_val, **trainer_kwargs}
        trainer_kwargs.setdefault("early_stopping", early_stopping)
        trainer_kwargs.setdefault("early_stopping_warmup_epochs", warmup_epochs)
        if trainer_kwargs["early_stopping"]:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)

        data_splitter = DataSplitter(
            self.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            external_indexing=external_indexing,
            data_path=data_path,
        )
        training_plan = VELOVITrainingPlan(self.module, **plan_kwargs)
        runner = TrainRunner(
            self,
            training_plan=training_plan,
            data_splitter=data_splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            **trainer_kwargs,
        )
        return runner()

    train.__doc__ = (
        train.__doc__.rstrip()
        + "\n\n        Notes\n        -----\n"
        + "\n".join("        " + line if line else line for line in DATA_PATH_DOC.splitlines())
        + "\n"
    )

    # ------------------------------------------------------------------ shared posterior machinery
    def _prepare(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        gene_list: Sequence[str] | None,
        n_samples: int,
        batch_size: int | None,
    ) -> tuple[AnnData, np.ndarray, np.ndarray]:
        adata = self._validate_anndata(adata)
        check_positive_int(n_samples, "n_samples")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        if indices is None:
            indices = np.arange(adata.n_obs)
        else:
            indices = np.asarray(indices)
            if indices.dtype == bool:
                if indices.shape != (adata.n_obs,):
                    raise ValueError(f"indices as a boolean mask must have length {adata.n_obs}.")
                indices = np.flatnonzero(indices)
            if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
                raise ValueError("indices must be a 1-D sequence of integer cell positions.")
            if indices.size and (indices.min() < -adata.n_obs or indices.max() >= adata.n_obs):
                raise ValueError(f"indices must lie in [0, {adata.n_obs}); got values outside.")
            indices = np.where(indices < 0, indices + adata.n_obs, indices)
        if gene_list is None:
            gene_idx = np.arange(adata.n_vars)
        else:
            if isinstance(gene_list, str):
                gene_list = [gene_list]
            gene_idx = adata.var_names.get_indexer(list(gene_list))
            if (gene_idx < 0).any():
                missing = [g for g, i in zip(gene_list, gene_idx, strict=True) if i < 0][:5]
                raise ValueError(f"gene_list has genes not in adata.var_names: {missing}.")
        return adata, indices, gene_idx

    @torch.inference_mode()
    def _posterior(
        self,
        adata: AnnData,
        indices: np.ndarray,
        n_samples: int,
        batch_size: int | None,
        fn,
        latent_dim: int | None = None,
        sample_pi: bool | str = True,
        log_pi: bool = False,
    ) -> list[np.ndarray]:
        """Run ``fn(tensors, generative_outputs)`` on all posterior samples, batched; concatenate over cells.

        The generative outputs hold the log state probabilities only with ``log_pi=True`` (for likelihoods).

        ``fn`` returns tensors with leading dims ``(samples, cells)``. Samples of one minibatch are drawn in
        as few passes as memory allows (blocks of about 2**24 values per tensor).
        """
        module = self.module
        module.eval()
        device = module.device  # looked up once (scvi's auto_move_data walks the parameters per call)
        n_genes = self.summary_stats["n_vars"]
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        results: list[np.ndarray] | None = None  # (samples, cells, ...) each, filled block by block
        first = 0
        for tensors in loader:
            inp = {k: v.to(device) for k, v in module._get_inference_input(tensors).items()}
            n_cells = inp["spliced"].shape[0]
            per_pass = max(1, min(n_samples, _SAMPLE_BLOCK // max(1, 4 * n_cells * n_genes)))
            qz = module._inference(**inp)[MODULE_KEYS.QZ_KEY]  # encoded once per minibatch
            done = 0
            while done < n_samples:
                s = min(per_pass, n_samples - done)
                z = qz.sample((s,))
                gen = module._generative(z, latent_dim=latent_dim, sample_pi=sample_pi, log_pi=log_pi)
                result = fn(inp, gen)
                if results is None:
                    shape = (n_samples, len(indices))
                    results = [np.empty(shape + tuple(r.shape[2:]), dtype=np.float32) for r in result]
                for out, r in zip(results, result, strict=True):
                    out[done : done + s, first : first + n_cells] = r.float().cpu().numpy()
                done += s
            first += n_cells
        if results is None:
            raise ValueError("indices selects no cells.")
        return results

    @staticmethod
    def _format(
        values: np.ndarray,
        n_samples: int,
        return_mean: bool,
        return_numpy: bool | None,
        obs_names: pd.Index,
        var_names: pd.Index,
    ) -> np.ndarray | pd.DataFrame:
        """``(samples, cells, genes)`` -> mean ``(cells, genes)`` DataFrame, or the samples as an array."""
        if n_samples == 1 or return_mean:
            values = values.mean(0)
        if return_numpy is None:
            return_numpy = values.ndim == 3
        if return_numpy or values.ndim == 3:
            return values
        return pd.DataFrame(values, index=obs_names, columns=var_names)

    def _overall_indices(self, indices: np.ndarray, n_samples_overall: int | None) -> np.ndarray:
        if n_samples_overall is None:
            return indices
        check_positive_int(n_samples_overall, "n_samples_overall")
        draw = torch.randint(len(indices), (n_samples_overall,)).numpy()
        return indices[draw]

    # ------------------------------------------------------------------ model-specific outputs
    # Posterior means of quantities linear in the state probabilities pi (expected time, expected velocity,
    # expression fit, mean state probabilities) use E[pi | z] (Rao-Blackwellised: the same expectation as
    # sampling pi, without its noise, and without the cost of Dirichlet draws); samples returned with
    # return_mean=False, 'max' statistics and likelihoods draw pi.
    def get_state_assignment(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        hard_assignment: bool = False,
        n_samples: int = 20,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> tuple[np.ndarray | pd.DataFrame, list[str]]:
        """Returns cells by genes by states probabilities.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If ``None``, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If ``None``, all cells are used.
        gene_list
            Return frequencies of expression for a subset of genes. This can save memory when working with
            large datasets, and few genes are of interest.
        hard_assignment
            Return a hard state assignment: a DataFrame (cells x genes) of the most probable state's name
            under the mean probabilities.
        n_samples
            Number of posterior samples to use for estimation.
        batch_size
            Minibatch size for data loading into the model. Defaults to ``scvi.settings.batch_size``.
        return_mean
            Whether to return the mean of the samples.
        return_numpy
            Not used for the probabilities, which are always an array (3-D does not fit a DataFrame);
            with ``hard_assignment=True``, return an array of state names instead of a DataFrame.

        Returns
        -------
        Tuple of the probabilities, shape ``(cells, genes, 4)`` (``(samples, cells, genes, 4)`` if
        ``n_samples > 1`` and ``return_mean`` is ``False``), or the hard assignment, and the list of state
        names ``['induction', 'induction_steady', 'repression', 'repression_steady']``.
        """
        adata, indices, genes = self._prepare(adata, indices, gene_list, n_samples, batch_size)
        gene_t = torch.as_tensor(genes, device=self.device)
        mean_only = hard_assignment or return_mean or n_samples == 1
        (pi,) = self._posterior(
            adata,
            indices,
            n_samples,
            batch_size,
            lambda t, g: (g["px_pi"].index_select(-2, gene_t),),
            sample_pi=not mean_only,
        )
        states = list(STATE_NAMES)
        if hard_assignment:
            names = np.asarray(states, dtype=object)[pi.mean(0).argmax(-1)]
            if return_numpy:
                return names, states
            return pd.DataFrame(names, index=adata.obs_names[indices], columns=adata.var_names[genes]), states
        if n_samples == 1 or return_mean:
            pi = pi.mean(0)
        return pi, states

    def get_latent_time(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        time_statistic: Literal["mean", "max"] = "mean",
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Returns the cells by genes latent time.

        Induction contributes ``rho * t_switch``, its steady state ``t_switch``, repression
        ``t_switch + tau (t_max - t_switch)`` and the repression steady state ``t_max`` (the original puts
        finished cells at time 0, i.e. at the start of the trajectory).

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If ``None``, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If ``None``, all cells are used.
        gene_list
            Return frequencies of expression for a subset of genes. This can save memory when working with
            large datasets, and few genes are of interest.
        time_statistic
            Whether to compute expected time over states, or maximum a posteriori time over maximal
            probability state.
        n_samples
            Number of posterior samples to use for estimation.
        n_samples_overall
            Number of overall samples to return. Setting this forces n_samples=1.
        batch_size
            Minibatch size for data loading into model. Defaults to ``scvi.settings.batch_size``.
        return_mean
            Whether to return the mean of the samples.
        return_numpy
            Return a :class:`~numpy.ndarray` instead of a :class:`~pandas.DataFrame`. DataFrame includes
            gene names as columns. If either ``n_samples=1`` or ``return_mean=True``, defaults to ``False``.
            Otherwise, it defaults to ``True``.

        Returns
        -------
        If ``n_samples`` > 1 and ``return_mean`` is False, then the shape is ``(samples, cells, genes)``.
        Otherwise, the shape is ``(cells, genes)``. In this case, the return type is
        :class:`~pandas.DataFrame` unless ``return_numpy`` is True.
        """
        _check_choice(time_statistic, "time_statistic", ("mean", "max"))
        adata, indices, genes = self._prepare(adata, indices, gene_list, n_samples, batch_size)
        if n_samples_overall is not None:
            indices, n_samples = self._overall_indices(indices, n_samples_overall), 1
        gene_t = torch.as_tensor(genes, device=self.device)
        (t,) = self._posterior(
            adata,
            indices,
            n_samples,
            batch_size,
            lambda tensors, g: (self.module.latent_time(g, time_statistic).index_select(-1, gene_t),),
            sample_pi=not _mean_only(time_statistic, n_samples, return_mean),
        )
        return self._format(
            t, n_samples, return_mean, return_numpy, adata.obs_names[indices], adata.var_names[genes]
        )

    def get_velocity(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        velo_statistic: str = "mean",
        velo_mode: Literal["spliced", "unspliced"] = "spliced",
        clip: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        """Returns cells by genes velocity estimates.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If ``None``, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If ``None``, all cells are used.
        gene_list
            Return velocities for a subset of genes. This can save memory when working with large datasets,
            and few genes are of interest.
        n_samples
            Number of posterior samples to use for estimation for each cell.
        n_samples_overall
            Number of overall samples to return. Setting this forces n_samples=1.
        batch_size
            Minibatch size for data loading into the model. Defaults to ``scvi.settings.batch_size``.
        return_mean
            Whether to return the mean of the samples.
        return_numpy
            Return a :class:`~numpy.ndarray` instead of a :class:`~pandas.DataFrame`. DataFrame includes
            gene names as columns. If either ``n_samples=1`` or ``return_mean=True``, defaults to ``False``.
            Otherwise, it defaults to ``True``.
        velo_statistic
            Whether to compute expected velocity over states (``'mean'``), or maximum a posteriori velocity
            over maximal probability state (``'max'``).
        velo_mode
            Compute ds/dt or du/dt.
        clip
            Clip to minus spliced value (minus unspliced value for ``velo_mode='unspliced'``), using the
            cells and genes of the ``adata``, ``indices`` and ``gene_list`` given.

        Returns
        -------
        If ``n_samples`` > 1 and ``return_mean`` is False, then the shape is ``(samples, cells, genes)``.
        Otherwise, the shape is ``(cells, genes)``. In this case, the return type is
        :class:`~pandas.DataFrame` unless ``return_numpy`` is True.
        """
        _check_choice(velo_statistic, "velo_statistic", ("mean", "max"))
        _check_choice(velo_mode, "velo_mode", ("spliced", "unspliced"))
        adata, indices, genes = self._prepare(adata, indices, gene_list, n_samples, batch_size)
        if n_samples_overall is not None:
            indices, n_samples = self._overall_indices(indices, n_samples_overall), 1
        gene_t = None if gene_list is None else torch.as_tensor(genes, device=self.device)

        def fn(tensors, g):
            v = self.module.velocity(g, velo_mode, velo_statistic)
            if clip:
                v = torch.maximum(v, tensors[velo_mode].neg())
            return (v if gene_t is None else v.index_select(-1, gene_t),)

        sample_pi = not _mean_only(velo_statistic, n_samples, return_mean)
        if sample_pi and velo_statistic == "mean":
            sample_pi = "induction_repression"  # the expected velocity reads only these two (exact, 3 draws)
        (v,) = self._posterior(adata, indices, n_samples, batch_size, fn, sample_pi=sample_pi)
        return self._format(
            v, n_samples, return_mean, return_numpy, adata.obs_names[indices], adata.var_names[genes]
        )

    def get_expression_fit(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        restrict_to_latent_dim: int | None = None,
    ) -> tuple[np.ndarray | pd.DataFrame, np.ndarray | pd.DataFrame]:
        r"""Returns the fitted spliced and unspliced abundance (s(t) and u(t)).

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If ``None``, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If ``None``, all cells are used.
        gene_list
            Return frequencies of expression for a subset of genes. This can save memory when working with
            large datasets, and few genes are of interest.
        n_samples
            Number of posterior samples to use for estimation.
        batch_size
            Minibatch size for data loading into the model. Defaults to ``scvi.settings.batch_size``.
        return_mean
            Whether to return the mean of the samples.
        return_numpy
            Return a :class:`~numpy.ndarray` instead of a :class:`~pandas.DataFrame`. DataFrame includes
            gene names as columns. If either ``n_samples=1`` or ``return_mean=True``, defaults to ``False``.
            Otherwise, it defaults to ``True``.
        restrict_to_latent_dim
            Decode the trajectory positions from this latent dimension only (the state probabilities still
            use the whole latent vector).

        Returns
        -------
        ``(fit_s, fit_u)``. If ``n_samples`` > 1 and ``return_mean`` is False, then each has shape
        ``(samples, cells, genes)``. Otherwise, the shape is ``(cells, genes)``. In this case, the return
        type is :class:`~pandas.DataFrame` unless ``return_numpy`` is True.
        """
        adata, indices, genes = self._prepare(adata, indices, gene_list, n_samples, batch_size)
        if restrict_to_latent_dim is not None and (
            isinstance(restrict_to_latent_dim, bool)
            or not (
                isinstance(restrict_to_latent_dim, (int, np.integer))
                and 0 <= restrict_to_latent_dim < self.n_latent
            )
        ):
            raise ValueError(
                f"restrict_to_latent_dim must be an integer in [0, {self.n_latent}), "
                f"got {restrict_to_latent_dim!r}."
            )
        gene_t = torch.as_tensor(genes, device=self.device)

        def fn(tensors, g):
            fit_s, fit_u = self.module.expression_fit(g)
            return fit_s.index_select(-1, gene_t), fit_u.index_select(-1, gene_t)

        fit_s, fit_u = self._posterior(
            adata,
            indices,
            n_samples,
            batch_size,
            fn,
            latent_dim=restrict_to_latent_dim,
            sample_pi=not _mean_only("mean", n_samples, return_mean),
        )
        names = adata.obs_names[indices], adata.var_names[genes]
        return (
            self._format(fit_s, n_samples, return_mean, return_numpy, *names),
            self._format(fit_u, n_samples, return_mean, return_numpy, *names),
        )

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """The model's denoised spliced abundance, i.e. the first element of :meth:`get_expression_fit`.

        (The original raises ``NotImplementedError``.) Arguments as in :meth:`get_expression_fit`.
        """
        fit_s, _ = self.get_expression_fit(
            adata, indices, gene_list, n_samples, batch_size, return_mean, return_numpy
        )
        return fit_s

    def get_gene_likelihood(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> np.ndarray | pd.DataFrame:
        r"""Returns the likelihood per gene. Higher is better.

        The log-density ``log p(u) + log p(s)`` of each cell and gene under the model's mixtures.

        Parameters
        ----------
        adata
            AnnData object with equivalent structure to initial AnnData. If ``None``, defaults to the
            AnnData object used to initialize the model.
        indices
            Indices of cells in adata to use. If ``None``, all cells are used.
        gene_list
            Return frequencies of expression for a subset of genes. This can save memory when working with
            large datasets, and few genes are of interest.
        n_samples
            Number of posterior samples to use for estimation.
        batch_size
            Minibatch size for data loading into the model. Defaults to ``scvi.settings.batch_size``.
        return_mean
            Whether to return the mean of the samples.
        return_numpy
            Return a :class:`~numpy.ndarray` instead of a :class:`~pandas.DataFrame`. DataFrame includes
            gene names as columns. If either ``n_samples=1`` or ``return_mean=True``, defaults to ``False``.
            Otherwise, it defaults to ``True``.

        Returns
        -------
        If ``n_samples`` > 1 and ``return_mean`` is False, then the shape is ``(samples, cells, genes)``.
        Otherwise, the shape is ``(cells, genes)``. In this case, the return type is
        :class:`~pandas.DataFrame` unless ``return_numpy`` is True.
        """
        adata, indices, genes = self._prepare(adata, indices, gene_list, n_samples, batch_size)
        gene_t = torch.as_tensor(genes, device=self.device)

        def fn(tensors, g):
            log_pu, log_ps = self.module.log_likelihood(tensors["spliced"], tensors["unspliced"], g)
            return ((log_pu + log_ps).index_select(-1, gene_t),)

        (ll,) = self._posterior(adata, indices, n_samples, batch_size, fn, log_pi=True)
        return self._format(
            ll, n_samples, return_mean, return_numpy, adata.obs_names[indices], adata.var_names[genes]
        )

    @torch.inference_mode()
    def get_rates(self) -> dict[str, np.ndarray]:
        """Return the learned splicing, degradation, and transcription rates.

        Rates are in the units of the registered layers (min-max-scaled data) and of ``t_max = 20``;
        :func:`cellvi.velovi.write_velovi_results` converts them to unscaled units.

        Returns
        -------
        dict with keys ``"beta"`` (splicing), ``"gamma"`` (degradation), ``"alpha"`` (transcription
        on-state), ``"alpha_1"`` (asymptotic transcription rate; equal to ``alpha`` unless the
        transcription rate is time-dependent), and ``"lambda_alpha"`` (its switching rate; 0 unless
        time-dependent), each as a numpy array of shape ``(n_genes,)``.
        """
        return {k: v.detach().cpu().numpy().copy() for k, v in self.module.get_rates().items()}

    def get_directional_uncertainty(
        self,
        adata: AnnData | None = None,
        n_samples: int = 50,
        gene_list: Iterable[str] | None = None,
        n_jobs: int = -1,
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Compute directional uncertainty of RNA velocity.

        Estimates the uncertainty of the velocity vector direction for each cell by sampling from the
        posterior and computing cosine similarities of the (gene-centred) samples to their mean. Vectorised
        over cells and samples; a cell whose velocity is zero gets cosine 0 instead of NaN.

        Parameters
        ----------
        adata
            AnnData object. If ``None``, uses the AnnData passed during model initialization.
        n_samples
            Number of posterior samples for estimating uncertainty.
        gene_list
            List of genes to use. If ``None``, uses all genes.
        n_jobs
            Number of parallel jobs (threads over blocks of cells) for cosine similarity computation.
            -1 uses all available cores.

        Returns
        -------
        Tuple of (DataFrame of directional statistics per cell, cosine similarity matrix
        ``(cells, samples)``).
        """
        check_positive_int(n_samples, "n_samples", minimum=2)
        if not (n_jobs == -1 or (isinstance(n_jobs, (int, np.integer)) and n_jobs >= 1)):
            raise ValueError(f"n_jobs must be -1 or an integer >= 1, got {n_jobs!r}.")
        adata = self._validate_anndata(adata)
        v = self.get_velocity(
            adata=adata, n_samples=n_samples, gene_list=gene_list, return_mean=False, return_numpy=True
        )
        df, cos = directional_statistics(v, n_jobs=n_jobs)
        df.index = adata.obs_names.copy()
        return df, cos

    def get_permutation_scores(
        self,
        labels_key: str,
        adata: AnnData | None = None,
        n_samples: int = 10,
        max_cells: int = 200,
        seed: int | None = 0,
    ) -> tuple[pd.DataFrame, AnnData]:
        """Compute permutation scores.

        Within each cell type, every gene's spliced and (independently) unspliced values are shuffled
        across cells; the model's fit error ``|s_hat - s| + |u_hat - u|`` on the permuted data is compared
        with the error on the original data by a t-test per gene and cell type. veloVI's permutation score
        of a gene is the maximum over cell types (``df.max(axis=1)``).

        Parameters
        ----------
        labels_key
            Key in adata.obs encoding cell types.
        adata
            AnnData object with equivalent structure to initial AnnData. If ``None``, defaults to the
            AnnData object used to initialize the model.
        n_samples
            Posterior samples averaged in each expression fit.
        max_cells
            At most this many cells per cell type enter each t-test (drawn at random; the original uses
            the first 200). Only these cells are fitted.
        seed
            Seed of the permutation and of the cell draw.

        Returns
        -------
        Tuple of DataFrame and AnnData. DataFrame is genes by cell types with the score per cell type.
        AnnData is the permuted version of the original AnnData (``obs``, ``var`` and the two registered
        layers).
        """
        check_positive_int(n_samples, "n_samples")
        adata = self._validate_anndata(adata)
        check_obs_key(adata, labels_key, "labels_key")
        check_positive_int(max_cells, "max_cells", minimum=2)
        rng = np.random.default_rng(seed)
        groups = np.asarray(adata.obs[labels_key].astype(str))
        s_layer = _layer_of(self, VELOVI_REGISTRY_KEYS.X_KEY)
        u_layer = _layer_of(self, VELOVI_REGISTRY_KEYS.U_KEY)
        permuted = AnnData(
            obs=adata.obs.copy(),
            var=adata.var.copy(),
            layers={
                s_layer: permute_within_groups(adata.layers[s_layer], groups, rng),
                u_layer: permute_within_groups(adata.layers[u_layer], groups, rng),
            },
        )
        permuted = self._validate_anndata(permuted)

        # only the cells that enter the t-tests are fitted (the permutation itself uses every cell)
        rows_by_group = sample_group_rows(groups, max_cells, rng)
        fitted = np.sort(np.concatenate(list(rows_by_group.values())))
        position = np.empty(adata.n_obs, dtype=np.int64)
        position[fitted] = np.arange(fitted.size)

        def fit_error(data):
            # residuals per minibatch (the data stay sparse outside it); mean over samples, then |.|
            def fn(tensors, g):
                fit_s, fit_u = self.module.expression_fit(g)
                return fit_s - tensors["spliced"], fit_u - tensors["unspliced"]

            res_s, res_u = self._posterior(data, fitted, n_samples, batch, fn, sample_pi=False)
            return np.abs(res_s.mean(0)) + np.abs(res_u.mean(0))

        # minibatches of about 2**17 (sample, cell, gene) values: few passes, each still cache-sized
        # (1000 cells x 50 genes, 10 samples: 262 cells per minibatch, 0.13 -> 0.12 s against 128)
        batch = max(128, _CACHE_BLOCK // max(1, n_samples * self.summary_stats["n_vars"]))

        err_orig = fit_error(adata)
        err_perm = fit_error(permuted)
        scores = group_ttests(err_perm, err_orig, {g: position[r] for g, r in rows_by_group.items()})
        scores.index = adata.var_names.copy()
        return scores, permuted


def _layer_of(model: VELOVI, key: str) -> str:
    for field in model.adata_manager.fields:
        if field.registry_key == key:
            return field.attr_key
    raise KeyError(key)


def _column_sums(X) -> np.ndarray:
    return row_sums(X.T) if not sparse.issparse(X) else np.asarray(X.sum(axis=0)).ravel()


def _mean_only(statistic: str, n_samples: int, return_mean: bool) -> bool:
    """Whether only a posterior mean of a quantity linear in the state probabilities is returned."""
    return statistic == "mean" and (return_mean or n_samples == 1)


def _check_choice(value, arg: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
