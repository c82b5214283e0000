"""AMICI with two data-parallel processes (Lightning DDP, gloo on the CPU), each holding the whole tissue."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
# _ddp_launch lives in tests/, on the path through the root conftest
from _ddp_launch import launch  # noqa: E402
from _ddp_rank import train_amici  # noqa: E402

PER_RANK_BATCH = 32


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_train_the_same_parameters_as_one_process(tmp_path):
    """2 ranks x minibatch 32 == 1 process x minibatch 64 with the same seed; ranks split every minibatch."""
    ranks = launch(HERE / "_ddp_rank.py", [str(PER_RANK_BATCH)], tmp_path, timeout=120)
    single = train_amici(batch_size=2 * PER_RANK_BATCH, datasplitter_kwargs={"seed": 0})

    train_idx = set(single["train_idx"].tolist())
    for epoch in range(2):
        # each rank iterates its half of every minibatch: disjoint, together all training cells once,
        # and minibatch k of rank 0 followed by that of rank 1 is minibatch k of the single process
        mine = [torch.cat(r["seen"][epoch]) for r in ranks]
        assert set(mine[0].tolist()).isdisjoint(mine[1].tolist())
        assert sorted(torch.cat(mine).tolist()) == sorted(train_idx)
        for k, batch in enumerate(single["seen"][epoch]):
            torch.testing.assert_close(
                torch.cat([ranks[0]["seen"][epoch][k], ranks[1]["seen"][epoch][k]]), batch
            )
    assert not torch.equal(torch.cat(single["seen"][0]), torch.cat(single["seen"][1]))  # reshuffled per epoch

    for name, value in single["params"].items():
        # DDP keeps the ranks in lockstep ...
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], rtol=0, atol=0)
        # ... and their averaged gradients are those of one process with both ranks' receivers
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-4, atol=1e-5)
    untrained = train_amici(batch_size=64, max_epochs=0)["params"]
    moved = max((single["params"][k] - untrained[k]).abs().max() for k in untrained if k != "ct_profiles")
    assert moved > 1e-3
