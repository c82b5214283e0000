"""AMICI trained on a tiny simulated tissue, for the two-process (DDP) test.

Run as a script it is one rank of a ``torchrun``-style launch (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``RANK``/``LOCAL_RANK`` set by the caller): it trains with ``strategy="ddp"`` on the CPU
(gloo) and writes its parameters and the receivers of each of its minibatches to ``argv[1]``.
Neighbour dropout is off so that the only randomness is the (seeded) minibatch order.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

N_CELLS, N_GENES, K = 400, 40, 10
TINY = {
    "n_heads": 2, "n_head_size": 8, "n_query_dim": 8, "n_query_embed_hidden": 16, "n_nn_embed": 16,
    "n_nn_embed_hidden": 16, "n_kv_dim": 16, "n_pos_coef_mlp_hidden": 8, "neighbor_dropout": 0.0,
}  # fmt: skip


class RecordBatches(Callback):
    """Receivers (rows of the AnnData) of every training minibatch, per epoch."""

    def __init__(self):
        self.seen: list[list[torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[-1].append(batch["_indices"].detach().cpu().clone())


def train_amici(batch_size: int, max_epochs: int = 2, **train_kwargs) -> dict:
    """Train AMICI (seed 0) on all but a fixed tenth of the cells; parameters and minibatches seen."""
    import scvi

    from cellvi.amici import AMICI
    from cellvi.data import simulate_spatial

    scvi.settings.seed = 0
    adata = simulate_spatial(n_cells=N_CELLS, n_genes=N_GENES, seed=1)
    AMICI.setup_anndata(adata, labels_key="cell_type", coord_obsm_key="spatial", n_neighbors=K)
    model = AMICI(adata, **TINY)
    train_idx = np.arange(N_CELLS)[np.arange(N_CELLS) % 10 != 0]  # 360 cells: no padding across 2 ranks
    record = RecordBatches()
    if max_epochs == 0:
        return {"params": {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}}
    model.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        external_indexing=[train_idx, np.arange(0, N_CELLS, 10), np.array([], dtype=np.int64)],
        enable_progress_bar=False,
        callbacks=[record],
        **train_kwargs,
    )
    params = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    return {"params": params, "seen": record.seen, "train_idx": torch.as_tensor(train_idx)}


if __name__ == "__main__":
    import scvi

    torch.set_num_threads(1)
    scvi.settings.logging_dir = os.path.dirname(sys.argv[1])
    ddp = {"accelerator": "cpu", "devices": int(os.environ["WORLD_SIZE"]), "strategy": "ddp"}
    torch.save(train_amici(batch_size=int(sys.argv[2]), **ddp), sys.argv[1])
