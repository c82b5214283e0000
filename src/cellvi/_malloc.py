"""Keep glibc from unmapping and re-mapping the heap between training steps (Linux only).

PyTorch's CPU tensors come from ``malloc``. glibc returns freed memory at the top of the heap to the
system once more than ``M_TRIM_THRESHOLD`` is free there, and serves blocks above ``M_MMAP_THRESHOLD``
by fresh mappings; both thresholds start at 128 KiB and grow only as large blocks are freed. A training
step allocates and frees the same megabytes of activations over and over, so the heap top is handed
back and faulted in again, page by page, on every step: for VELOVI on 1000 cells x 300 genes, 11,000-17,000
page faults per epoch (about 1.6 us each) and 185-199 ms per epoch, against 120-200 faults and 150-154 ms
with the pages kept (the original veloVI, same process: 420-445 ms either way).

:func:`keep_heap_pages` fixes both thresholds where glibc's own adjustment tops out on 64-bit systems
(``mmap`` from 32 MiB, trim above 64 MiB free), so the pages stay mapped and are reused. The setting
is process-wide (every later ``malloc`` in the process sees it) and only changes when memory goes back
to the system, not how much is used; glibc reaches the same state by itself once a process frees a
32 MiB block. Every cellvi training calls it when fitting starts. It does nothing outside glibc, when
either threshold is already set through glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables, or when ``CELLVI_KEEP_HEAP_PAGES=0``.
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
