"""glibc heap thresholds set when training starts (cellvi._malloc): freed pages stay mapped between steps."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import cellvi
import cellvi._training
from cellvi import _malloc

#: A training step's allocation pattern: a chain of 20 fresh 1 MiB temporaries, freed together.
_CHURN = textwrap.dedent(
    """
    import json, resource, sys, torch

    def faults_per_round():
        x = torch.rand(1 << 18)
        def once():
            ts = [x]
            for k in range(20):
                ts.append(ts[-1] * 1.0001 + k)
        once()
        counts = []
        for _ in range(21):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            once()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return sorted(counts)[10]  # the median round

    before = faults_per_round()
    from cellvi._malloc import keep_heap_pages
    kept = keep_heap_pages()
    print(json.dumps({"before": before, "kept": kept, "after": faults_per_round()}))
    """
)


def _churn(**env) -> dict:
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "CELLVI_KEEP"))}
    out = subprocess.run(
        [sys.executable, "-c", _CHURN], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_keep_heap_pages_stops_the_page_faults_of_repeated_temporaries():
    on, off = _churn(), _churn(CELLVI_KEEP_HEAP_PAGES="0")
    assert on["kept"] is _GLIBC
    assert off["kept"] is False
    if _GLIBC:  # the heap top is handed back and faulted in again every round, unless the pages are kept
        assert min(on["before"], off["before"], off["after"]) > 200
        assert on["after"] * 10 < off["after"]


def test_keep_heap_pages_respects_the_users_glibc_settings():
    assert _churn(MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert _churn(MALLOC_MMAP_THRESHOLD_="131072")["kept"] is False


def test_training_sets_the_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr(cellvi._training, "keep_heap_pages", lambda: calls.append(1) or True)
    adata = cellvi.data.simulate_velocity(n_obs=60, n_vars=8, seed=0)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="spliced", unspliced_layer="unspliced")
    cellvi.VELOVI(adata, n_hidden=16).train(max_epochs=1, enable_progress_bar=False)
    assert calls == [1]


@pytest.mark.parametrize("flag", ["0", "false", "off"])
def test_opt_out_values(monkeypatch, flag):
    monkeypatch.setenv("CELLVI_KEEP_HEAP_PAGES", flag)
    assert _malloc._set_thresholds() is False
