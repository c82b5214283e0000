"""Shared test settings: one torch thread per worker, seeded, quiet, non-interactive plotting."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import scvi

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    yield
