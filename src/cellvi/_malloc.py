"""Keep glibc from unmapping and re-mapping the heap between training steps (Linux only).

PyTorch's CPU tensors come from ``malloc``. glibc returns freed memory at the top of the heap to the
system once more than ``M_TRIM_THRESHOLD`` is free there, and serves blocks above ``M_MMAP_THRESHOLD``
by fresh mappings; both thresholds start at 128 KiB and grow only as large blocks are freed. A training
step allocates and frees the same megabytes of activations over and over, so the heap top is handed
back and faulted in again, page by page, on every step: for VELOVI on 1000 cells x 300 genes, 11,000-17,000
page faults per epoch (about 1.6 us each) and 185-199 ms per epoch, against 120-200 faults and 150-154 ms
with the pages kept (the original veloVI, same process: 420-445 ms either way).

:func:`keep_heap_pages` fixes both thresholds near where glibc's own adjustment tops out on 64-bit systems
(blocks from 32 MiB are mapped, the heap is trimmed above 64 MiB free), so the pages stay mapped and are
reused. The setting is process-wide and lasts for the process (``mallopt`` also ends glibc's dynamic
adjustment). It changes when memory goes back to the system, not what is allocated: up to 64 MiB of free
heap stays mapped, and blocks under 32 MiB come from the heap, where fragmentation can keep freed memory
mapped. glibc's dynamic adjustment moves towards the same values by itself whenever a process frees a
large mapped block. Every cellvi training calls it when fitting starts (on any accelerator: the CPU side of
a GPU training allocates too). It does nothing outside glibc, when either threshold is already set (glibc's
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables or ``GLIBC_TUNABLES``), when
another allocator is preloaded (``LD_PRELOAD`` naming jemalloc, tcmalloc or mimalloc), or when
``CELLVI_KEEP_HEAP_PAGES=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its dynamic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``), and the
#: trim threshold it pairs with it (twice the mmap threshold).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_done: bool | None = None


def keep_heap_pages() -> bool:
    """Set glibc's mmap and trim thresholds once per process (see the module docstring).

    Returns whether they are set by cellvi in this process.
    """
    global _done
    if _done is None:
        _done = _set_thresholds()
    return _done


def _set_thresholds() -> bool:
    if os.environ.get("CELLVI_KEEP_HEAP_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user's own glibc settings
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables:
        return False
    preload = os.environ.get("LD_PRELOAD", "").lower()
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False  # glibc's malloc is not the one in use
    return _apply()


def _apply() -> bool:
    """``mallopt`` both thresholds (glibc on Linux only); whether both were set."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
