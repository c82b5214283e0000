"""Two-process data-parallel training (Lightning DDP, gloo on the CPU) on cellvi's data path.

One launch of two ranks runs every case of ``_ddp.py`` (one interpreter start-up each); the
tests compare each case with the same function run in this process without DDP.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ddp

PER_RANK_BATCH = 32
CASES = ["toy", "semi", "scar"]

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's ``{case: result}`` from one two-process launch."""
    return _ddp.launch(CASES, tmp_path_factory.mktemp("ddp"))


def _distance(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt())


def _assert_lockstep(ranks, case):
    """DDP keeps the ranks' parameters identical (gradients are averaged before every step)."""
    p0, p1 = (r[case]["params"] for r in ranks)
    assert p0.keys() == p1.keys() and len(p0) > 3
    for name, value in p0.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(p1[name], value, rtol=0, atol=0)


def test_two_ranks_train_the_same_parameters_as_one_process(ranks):
    """Deterministic toy model: 2 ranks x minibatch 32 == 1 process x minibatch 64 (same seed)."""
    _assert_lockstep(ranks, "toy")
    single = _ddp.case_toy({}, batch_size=2 * PER_RANK_BATCH)["params"]
    for name, value in single.items():
        # averaged gradients are those of one process with both ranks' cells
        torch.testing.assert_close(ranks[0]["toy"]["params"][name], value, rtol=1e-4, atol=1e-5)
    # training moved the parameters (the comparison is not between two untrained models)
    untrained = _ddp.case_toy({}, max_epochs=0)["params"]
    assert _distance(single, untrained) > 1e-3


def test_semi_supervised_ranks_share_the_full_loader(ranks):
    """SCANVI (semi-supervised path): each rank gets its share of the (full, labelled) pairs.

    An epoch covers all of a rank's 135 of the 270 training cells (5 minibatches of 32, the
    labelled loader restarting), and the ranks stay in lockstep.
    """
    assert [r["semi"]["loader"] for r in ranks] == ["SemiSupervisedDeviceDataLoader"] * 2
    assert ranks[0]["semi"]["steps"] == ranks[1]["semi"]["steps"] == 5
    _assert_lockstep(ranks, "semi")


def test_scar_ddp_consistent_with_single_process(ranks):
    """cellvi.SCAR on 2 ranks x minibatch 32 trains like 1 process x minibatch 64.

    SCAR samples its latent and normalises batches per rank, so the comparison is statistical:
    the DDP parameters lie as close to the single-process ones as a second single-process run
    with other latent draws does (same start, same minibatch order), and closer than a
    single process with minibatch 32 (twice the steps) does.
    """
    _assert_lockstep(ranks, "scar")
    ddp = ranks[0]["scar"]
    single = _ddp.case_scar({}, batch_size=2 * PER_RANK_BATCH)
    other_draws = _ddp.case_scar({}, batch_size=2 * PER_RANK_BATCH, noise_seed=1)
    # the ranks split each epoch: 256 cells / (2 x 32) = 4 steps, as the single process
    assert ddp["steps"] == single["steps"] == _ddp.SCAR_CELLS // (2 * PER_RANK_BATCH)
    # same initial parameters (seeded model construction on every rank)
    for name, value in single["init"].items():
        torch.testing.assert_close(ddp["init"][name], value, rtol=0, atol=0)
    moved = _distance(single["params"], single["init"])
    spread = _distance(other_draws["params"], single["params"])
    assert 0 < spread < moved
    assert _distance(ddp["params"], single["params"]) < 1.6 * spread
    # the training objective follows the single-process one (rank 0 logs its share's ELBO)
    assert ddp["elbo"][-1] < ddp["elbo"][0]
    assert abs(ddp["elbo"][-1] - single["elbo"][-1]) < 0.03 * abs(single["elbo"][-1])
