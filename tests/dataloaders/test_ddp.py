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
CASES = ["toy", "semi", "scar", "fadvi"]

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


def _assert_trains_like_one_process(ddp, single, other_draws, elbo_rtol):
    """Rank 0 of a DDP run against the single-process run with twice the minibatch.

    Same initial parameters (seeded construction on every rank); the trained parameters within
    1.6x the spread between two single-process runs that differ only in their latent draws; the
    logged ELBO (rank 0's share) falls and ends within ``elbo_rtol`` of the single process's.
    """
    for name, value in single["init"].items():
        torch.testing.assert_close(ddp["init"][name], value, rtol=0, atol=0)
    moved = _distance(single["params"], single["init"])
    spread = _distance(other_draws["params"], single["params"])
    assert 0 < spread < moved
    assert _distance(ddp["params"], single["params"]) < 1.6 * spread
    assert ddp["elbo"][-1] < ddp["elbo"][0]
    assert abs(ddp["elbo"][-1] - single["elbo"][-1]) < elbo_rtol * abs(single["elbo"][-1])


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
    _assert_trains_like_one_process(ddp, single, other_draws, elbo_rtol=0.03)


def test_fadvi_ddp_consistent_with_single_process(ranks):
    """cellvi.FADVI on 2 ranks x minibatch 32 trains like 1 process x minibatch 64.

    Label subsampling (``n_samples_per_label``) on the semi-supervised data path: both ranks draw
    the same subsample each epoch (the one the single process draws) and split it, each labelled
    cell read by one rank. FADVI samples its latent and its adversaries standardise within each
    (per-rank) minibatch, so the parameters are compared statistically, as SCAR's.
    """
    import numpy as np

    _assert_lockstep(ranks, "fadvi")
    r0, r1 = ranks[0]["fadvi"], ranks[1]["fadvi"]
    single = _ddp.case_fadvi({}, batch_size=2 * PER_RANK_BATCH)
    other_draws = _ddp.case_fadvi({}, batch_size=2 * PER_RANK_BATCH, noise_seed=1)
    # 256 cells / (2 x 32) = 4 steps; the 120 subsampled labelled cells (3 classes x 40) restart
    assert r0["steps"] == r1["steps"] == single["steps"] == _ddp.FADVI_CELLS // (2 * PER_RANK_BATCH)
    n_sub = 3 * _ddp.FADVI_PER_LABEL
    subsamples = [tuple(map(tuple, r["fadvi"]["subsample"])) for r in ranks]
    assert len(r0["subsample"]) == 3 and all(len(sub) == n_sub for sub in r0["subsample"])
    # a fresh subsample each epoch, the same on both ranks and in the single process
    assert subsamples[0] == subsamples[1] == tuple(map(tuple, single["subsample"]))
    assert not np.array_equal(r0["subsample"][0], r0["subsample"][1])
    for epoch, sub in enumerate(r0["subsample"]):
        mine, theirs = r0["visited"][epoch], r1["visited"][epoch]
        assert len(mine) == len(theirs) == n_sub // 2
        assert np.intersect1d(mine, theirs).size == 0
        np.testing.assert_array_equal(np.union1d(mine, theirs), sub)
    _assert_trains_like_one_process(r0, single, other_draws, elbo_rtol=0.02)
