"""A torchrun-style launcher for two-process (gloo, CPU) data-parallel tests, and the cases it runs.

:func:`launch` starts ``world_size`` Python processes running this file, each with the
environment variables ``torchrun`` sets (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``) and ``cwd`` in a temporary directory (Lightning's DDP logger writes
``./lightning_logs``). Each rank runs the named cases of :data:`CASES` one after the other (one
interpreter start-up for all of them) and saves ``{case: result}`` with ``torch.save``.

A case is ``case(trainer_kwargs) -> dict`` where ``trainer_kwargs`` selects DDP
(``accelerator="cpu", devices=2, strategy=...``); the same function called in the test process
with ``{}`` is the single-process reference, so both sides train the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent

# -- cases ---------------------------------------------------------------------------------------


def _params(module) -> dict[str, torch.Tensor]:
    # parameters only: BatchNorm running statistics are per-rank buffers (DDP broadcasts rank 0's)
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters()}


def _steps(model) -> int:
    return len(model.trainer.train_dataloader)


def case_toy(trainer_kwargs: dict, batch_size: int = 32, max_epochs: int = 2) -> dict:
    """The deterministic toy autoencoder (``_toy.py``): DDP equals one process exactly."""
    from _toy import train_toy

    params = train_toy(
        batch_size=batch_size,
        max_epochs=max_epochs,
        datasplitter_kwargs={"seed": 0, "data_path": "device"},
        **trainer_kwargs,
    )
    return {"params": params}


def case_semi(trainer_kwargs: dict) -> dict:
    """SCANVI on the semi-supervised data path (as FADVI before it adopted it)."""
    from _toy import train_semi_supervised

    if trainer_kwargs:
        # scvi's semi-supervised modules have parameters a step may not use (as scvi's docs advise)
        trainer_kwargs = {**trainer_kwargs, "strategy": "ddp_find_unused_parameters_true"}
    semi = train_semi_supervised(**trainer_kwargs)
    loader = semi.trainer.train_dataloader
    return {"params": _params(semi.module), "loader": type(loader).__name__, "steps": len(loader)}


SCAR_CELLS = 256


def case_scar(
    trainer_kwargs: dict, batch_size: int = 32, max_epochs: int = 3, noise_seed: int | None = None
) -> dict:
    """cellvi.SCAR (default architecture, batch norm on) on a tiny simulation, ``data_path="device"``.

    ``noise_seed`` reseeds torch's generator after the model is built (same initial parameters,
    same minibatch order, other latent draws): two single-process runs that differ only in it give
    the run-to-run spread that DDP is compared with.
    """
    import scvi

    import cellvi

    scvi.settings.seed = 0
    adata, raw = cellvi.data.simulate_ambient(
        n_cells=SCAR_CELLS, n_genes=60, n_empty=600, n_damaged=0, seed=4
    )
    cellvi.SCAR.setup_anndata(adata)
    cellvi.SCAR.get_ambient_profile(adata, raw)
    model = cellvi.SCAR(adata, n_hidden=32, n_latent=4, n_layers=1)
    init = _params(model.module)
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    model.train(
        max_epochs=max_epochs,
        train_size=1.0,
        batch_size=batch_size,
        enable_progress_bar=False,
        data_path="device",
        datasplitter_kwargs={"seed": 0},
        **trainer_kwargs,
    )
    return {
        "init": init,
        "params": _params(model.module),
        "steps": _steps(model),
        # Lightning logs on rank 0 only
        "elbo": model.history["elbo_train"].to_numpy().ravel().astype(float)
        if "elbo_train" in model.history
        else None,
    }


FADVI_CELLS = 256
FADVI_PER_LABEL = 40


def case_fadvi(
    trainer_kwargs: dict, batch_size: int = 32, max_epochs: int = 3, noise_seed: int | None = None
) -> dict:
    """cellvi.FADVI on a tiny simulation with unlabelled cells, ``data_path="device"``.

    ``n_samples_per_label`` subsamples the labelled cells every epoch (numpy's global generator,
    as scvi): each rank must draw the same subsample and read its own share of it. The labelled
    cells each rank visited per epoch are recorded (positions of the labelled loader's sampler).
    ``noise_seed`` as in :func:`case_scar`.
    """
    import numpy as np
    import scvi
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.callbacks import Callback

    import cellvi

    class Record(Callback):
        def __init__(self):
            self.subsample, self.visited = [], []

        def on_train_epoch_end(self, trainer, pl_module):
            labelled = trainer.train_dataloader.labelled
            self.subsample.append(np.sort(labelled.indices))
            self.visited.append(np.sort(labelled.indices[labelled.sampler.epoch_order().cpu().numpy()]))

    if trainer_kwargs:
        # the latent-library encoder and the decoder's per-cell dispersion layer take no part in
        # the default loss (observed library, gene-wise dispersion): DDP must be told
        trainer_kwargs = {**trainer_kwargs, "strategy": "ddp_find_unused_parameters_true"}
    scvi.settings.seed = 0
    adata = cellvi.data.simulate_batches(
        n_cells=FADVI_CELLS, n_genes=60, n_batches=2, n_labels=3, unlabeled_fraction=0.3, seed=5
    )
    cellvi.FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels", unlabeled_category="Unknown")
    model = cellvi.FADVI(adata, n_hidden=32, n_latent_b=3, n_latent_l=3, n_latent_r=2, n_layers=1)
    init = _params(model.module)
    if not trainer_kwargs:
        # Lightning's DDP reseeds every rank (reset_seed) as it sets up: the single process does
        # the same here, so both draw the same label subsamples
        reset_seed()
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    record = Record()
    model.train(
        max_epochs=max_epochs,
        train_size=1.0,
        batch_size=batch_size,
        n_samples_per_label=FADVI_PER_LABEL,
        enable_progress_bar=False,
        data_path="device",
        datasplitter_kwargs={"seed": 0},
        callbacks=[record],
        **trainer_kwargs,
    )
    return {
        "init": init,
        "params": _params(model.module),
        "steps": _steps(model),
        "subsample": record.subsample,
        "visited": record.visited,
        "elbo": model.history["elbo_train"].to_numpy().ravel().astype(float)
        if "elbo_train" in model.history
        else None,
    }


CASES = {"toy": case_toy, "semi": case_semi, "scar": case_scar, "fadvi": case_fadvi}

# -- launcher ------------------------------------------------------------------------------------


def launch(cases: list[str], workdir: Path, world_size: int = 2, timeout: float = 300) -> list[dict]:
    """Run ``cases`` on ``world_size`` gloo ranks; return each rank's ``{case: result}``."""
    from _ddp_launch import launch as launch_ranks  # tests/ is on the test process's path, not the ranks'

    return launch_ranks(HERE / "_ddp.py", cases, workdir, world_size, timeout)


def _main(out: str, cases: list[str]) -> None:
    import scvi

    torch.set_num_threads(1)
    scvi.settings.logging_dir = os.path.dirname(out)
    ddp = {"accelerator": "cpu", "devices": int(os.environ["WORLD_SIZE"]), "strategy": "ddp"}
    torch.save({name: CASES[name](ddp) for name in cases}, out)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2:])
