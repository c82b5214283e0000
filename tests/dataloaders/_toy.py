"""A tiny deterministic model on cellvi's data path, for the data-path and DDP tests.

A linear autoencoder of log1p counts with a mean squared error: no sampling and no batch
normalisation, so data-parallel training over R ranks with minibatch B gives the same gradients
as one process with minibatch R * B (the loss is a mean over cells).

``_ddp.py`` trains it (and SCANVI on the semi-supervised path) on two gloo ranks.
"""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from cellvi.dataloaders import DataPathMixin

N_CELLS, N_GENES, N_LATENT = 300, 40, 4


class ToyModule(BaseModuleClass):
    def __init__(self, n_genes: int, n_latent: int = N_LATENT):
        super().__init__()
        self.encoder = torch.nn.Linear(n_genes, n_latent)
        self.decoder = torch.nn.Linear(n_latent, n_genes)

    def _get_inference_input(self, tensors):
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    @auto_move_data
    def inference(self, x):
        return {"z": self.encoder(torch.log1p(x))}

    def _get_generative_input(self, tensors, inference_outputs):
        return {"z": inference_outputs["z"]}

    @auto_move_data
    def generative(self, z):
        return {"x_hat": self.decoder(z)}

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        x = torch.log1p(tensors[REGISTRY_KEYS.X_KEY])
        per_cell = ((generative_outputs["x_hat"] - x) ** 2).sum(-1)
        return LossOutput(loss=per_cell.mean(), reconstruction_loss=per_cell)


class ToyAE(DataPathMixin, UnsupervisedTrainingMixin, BaseModelClass):
    def __init__(self, adata):
        super().__init__(adata)
        self.module = ToyModule(self.summary_stats.n_vars)
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def setup_anndata(cls, adata, layer=None, **kwargs):
        setup_method_args = cls._get_setup_method_args(**locals())
        manager = AnnDataManager(
            fields=[LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True)],
            setup_method_args=setup_method_args,
        )
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)


def toy_adata():
    from cellvi.data import simulate_ambient

    adata, _ = simulate_ambient(n_cells=N_CELLS, n_genes=N_GENES, n_empty=10, n_damaged=0, seed=3)
    return adata


def train_toy(batch_size: int, max_epochs: int = 2, **train_kwargs) -> dict[str, torch.Tensor]:
    """Train the toy model on the toy data (seed 0) and return its parameters."""
    import scvi

    scvi.settings.seed = 0
    adata = toy_adata()
    ToyAE.setup_anndata(adata)
    model = ToyAE(adata)
    model.train(
        max_epochs=max_epochs,
        train_size=1.0,
        batch_size=batch_size,
        enable_progress_bar=False,
        **train_kwargs,
    )
    return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}


def train_semi_supervised(**train_kwargs):
    """SCANVI (scvi's semi-supervised model, as FADVI) on cellvi's semi-supervised data path."""
    import numpy as np
    import scvi
    from scvi.model import SCANVI

    from cellvi.dataloaders import SemiSupervisedDataPathMixin

    class FastSCANVI(SemiSupervisedDataPathMixin, SCANVI):
        pass

    scvi.settings.seed = 0
    adata = toy_adata()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(adata.n_obs) < 0.5] = "unknown"
    adata.obs["label"] = labels
    FastSCANVI.setup_anndata(adata, labels_key="label", unlabeled_category="unknown")
    model = FastSCANVI(adata, n_latent=3, n_hidden=16)
    model.train(
        max_epochs=2, batch_size=32, n_samples_per_label=20, enable_progress_bar=False, **train_kwargs
    )
    return model

