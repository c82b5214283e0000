"""Two-process data-parallel training (Lightning DDP, gloo on the CPU) on cellvi's data path."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _toy import train_toy

PER_RANK_BATCH = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_train_the_same_parameters_as_one_process(tmp_path):
    """torchrun-style launch: 2 ranks x minibatch 32 == 1 process x minibatch 64 (same seed)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    procs = []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.pt"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_toy.py"), str(out), str(PER_RANK_BATCH)],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                cwd=tmp_path,  # Lightning's DDP logger writes ./lightning_logs
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"

    single = train_toy(batch_size=2 * PER_RANK_BATCH, datasplitter_kwargs={"seed": 0, "data_path": "device"})
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ranks = [r["toy"] for r in results]
    for name, value in single.items():
        # DDP keeps the ranks in lockstep ...
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        # ... and their averaged gradients are those of one process with both ranks' cells
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    # training moved the parameters (the comparison is not between two untrained models)
    untrained = train_toy(batch_size=64, max_epochs=0)
    assert max((single[k] - untrained[k]).abs().max() for k in single) > 1e-3

    # semi-supervised (SCANVI, as FADVI): each rank gets its share of the (full, labelled) pairs,
    # an epoch covers all its 135 of the 270 training cells (5 minibatches of 32, the labelled
    # loader restarting), and the ranks stay in lockstep
    assert [r["semi_loader"] for r in results] == ["SemiSupervisedDeviceDataLoader"] * 2
    assert results[0]["semi_steps"] == results[1]["semi_steps"] == 5
    assert len(results[0]["semi"]) > 10
    for name, value in results[0]["semi"].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(results[1]["semi"][name], value, rtol=0, atol=0)
