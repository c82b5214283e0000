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

#: A training step's allocation pattern: a chain of 20 fresh 1 MiB temporaries, freed together. Page faults
#: per round (the median of 21) before and after ``keep_heap_pages()`` (argv[2] "keep") or the bare
#: ``mallopt`` calls (argv[2] "apply") in a fresh process.
_CHURN = textwrap.dedent(
    """
    import importlib.util, json, resource, sys, torch

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
        return sorted(counts)[10]

    before = faults_per_round()
    # cellvi/_malloc.py alone: importing the package would reshape the heap first
    spec = importlib.util.spec_from_file_location("cellvi_malloc", sys.argv[1])
    malloc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(malloc)
    kept = malloc.keep_heap_pages() if sys.argv[2] == "keep" else malloc._apply()
    print(json.dumps({"before": before, "kept": kept, "after": faults_per_round()}))
    """
)

#: glibc's initial thresholds (128 KiB), fixed: the regime in which the heap top is handed back and faulted
#: in again on every round (glibc's dynamic thresholds start there and grow only as large blocks are freed).
_GLIBC_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _churn(how: str = "keep", **env) -> dict:
    import json

    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "CELLVI_KEEP", "GLIBC_TUNABLES"))
    }
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, _malloc.__file__, how],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _small_pages() -> bool:
    """4 KiB pages without transparent huge pages for every heap (where one 1 MiB block is 256 faults)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            thp_always = "[always]" in fh.read()
    except OSError:
        thp_always = False
    return os.sysconf("SC_PAGE_SIZE") == 4096 and not thp_always


def test_keep_heap_pages_sets_the_thresholds_on_glibc_unless_turned_off():
    assert _churn()["kept"] is _GLIBC
    assert _churn(CELLVI_KEEP_HEAP_PAGES="0")["kept"] is False


@pytest.mark.skipif(
    not (_GLIBC and _small_pages()), reason="needs glibc, 4 KiB pages and no always-on huge pages"
)
def test_the_thresholds_stop_the_page_faults_of_repeated_temporaries():
    user = _churn(**_GLIBC_DEFAULTS)  # the user's settings win: nothing changes
    assert user["kept"] is False
    assert min(user["before"], user["after"]) > 200
    applied = _churn("apply", **_GLIBC_DEFAULTS)  # the same start, then cellvi's thresholds
    assert applied["kept"] is True
    assert applied["before"] > 200
    assert applied["after"] * 10 < applied["before"]


def test_keep_heap_pages_respects_the_users_glibc_settings():
    assert _churn(MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert _churn(MALLOC_MMAP_THRESHOLD_="131072")["kept"] is False
    assert _churn(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")["kept"] is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
        ("CELLVI_KEEP_HEAP_PAGES", "off"),
    ],
)
def test_no_thresholds_under_other_settings_or_allocators(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert _malloc._set_thresholds() is False


def test_training_sets_the_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr(cellvi._training, "keep_heap_pages", lambda: calls.append(1) or True)
    adata = cellvi.data.simulate_velocity(n_obs=60, n_vars=8, seed=0)
    cellvi.VELOVI.setup_anndata(adata, spliced_layer="spliced", unspliced_layer="unspliced")
    cellvi.VELOVI(adata, n_hidden=16).train(max_epochs=1, enable_progress_bar=False)
    assert calls == [1]
