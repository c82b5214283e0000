"""A torchrun-style launcher for data-parallel (gloo, CPU) tests, shared by the test folders.

:func:`launch` starts ``world_size`` Python processes running ``script``, each with the environment
variables ``torchrun`` sets (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``) and ``cwd`` in ``workdir`` (Lightning's DDP logger writes ``./lightning_logs``).
Rank ``r`` is called as ``script workdir/rank{r}.pt *args`` and must ``torch.save`` its result
there; :func:`launch` returns the results in rank order.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], workdir: Path, world_size: int = 2, timeout: float = 300) -> list:
    """Run ``script`` on ``world_size`` gloo ranks; return each rank's saved result."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(script).parent), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(workdir / f"rank{rank}.pt"), *args],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            raise
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"DDP rank {rank} failed (exit {p.returncode}):\n{log[-4000:]}")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
