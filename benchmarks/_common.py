"""Shared helpers of the benchmark scripts: timing with peak memory, and a JSON report for ``run_all.py``.

Every ``benchmarks/<model>.py`` accepts ``--json PATH`` and, when given, writes a :class:`Report`
there (atomically) besides printing its figures::

    from _common import Report, measure

    report = Report("scar", settings={"n_cells": 2000, "epochs": 100})
    m_orig = measure(lambda: original.train(...))
    m_new = measure(lambda: model.train(...))
    report.speed("training", cellvi_s=m_new.cpu_s, original_s=m_orig.cpu_s, clock="cpu")
    report.memory("training", cellvi_mb=m_new.peak_mb, original_mb=m_orig.peak_mb)
    report.quality("per-cell log1p corr to truth", cellvi=0.95, original=0.79, better="higher")
    report.write(args.json)

Speeds are ratios ``original / cellvi`` of times measured in the same run on the same data with the same
settings (``> 1``: cellvi is faster). Peak memory is the largest resident-set growth of the process
while the call ran, sampled every 10 ms (the operating system's figure: it includes torch's allocator).

:meth:`Report.write` also records when, how and where the figures were made (``meta``: UTC date, the
command line, CPU cores and model, torch threads, GPU), which ``run_all.py --render`` shows with each table;
:meth:`Report.table` adds a free-form table (e.g. the rows of a scaling run).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@dataclass
class Measurement:
    """What :func:`measure` returns: the call's result, wall and CPU seconds, peak RSS growth in MiB."""

    result: Any
    wall_s: float
    cpu_s: float
    peak_mb: float


def measure(fn: Callable[[], Any], interval: float = 0.01) -> Measurement:
    """Run ``fn()`` and return its result with wall time, process CPU time and peak memory growth."""
    start = _rss_mb()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = fn()
    finally:
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_mb())
    return Measurement(out, wall, cpu, max(0.0, peak[0] - start))


def allocator_env() -> dict[str, str]:
    """glibc's heap thresholds as environment variables, for benchmark subprocesses of both sides.

    cellvi's training sets them in its own process (:func:`cellvi._malloc.keep_heap_pages`: freed heap pages
    stay mapped between steps); the originals' processes get the same settings through these variables, so
    that both sides run with the same allocator."""
    import importlib.util

    # the one file, not the package (the parents of the originals' processes need not import cellvi)
    spec = importlib.util.spec_from_file_location(
        "_cellvi_malloc", Path(__file__).resolve().parent.parent / "src" / "cellvi" / "_malloc.py"
    )
    malloc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(malloc)
    return {
        "MALLOC_MMAP_THRESHOLD_": str(malloc.MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(malloc.TRIM_THRESHOLD),
    }


def same_allocator() -> None:
    """Set glibc's heap thresholds in this process before anything is timed (both sides of an in-process
    benchmark then run with them, whichever trains first; see :func:`allocator_env`)."""
    from cellvi._malloc import keep_heap_pages

    keep_heap_pages()


def alternating(items: dict, rounds: int):
    """``(round, key, value)`` for ``rounds`` rounds over ``items``, the order reversed every other round, so
    that load changes hit both sides and the first call after the other side's does not always fall on the
    same side."""
    for r in range(rounds):
        for key, value in list(items.items())[:: 1 if r % 2 == 0 else -1]:
            yield r, key, value


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of ``a - b`` over paired values (e.g. per seed) and its standard error (NaN for one pair)."""
    import numpy as np

    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def at_least_as_good(q: dict) -> bool | None:
    """Whether cellvi's value of a quality row is at least as good as the original's (None: no original)."""
    c, o = q.get("cellvi"), q.get("original")
    if (
        c is None
        or o is None
        or (isinstance(o, float) and math.isnan(o))
        or (isinstance(c, float) and math.isnan(c))
    ):
        return None
    tol = q.get("tolerance", 0.0)
    return c >= o - tol if q.get("better", "higher") == "higher" else c <= o + tol


@dataclass
class Report:
    """Figures of one benchmark run, written as JSON for ``benchmarks/run_all.py``."""

    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    speeds: list[dict[str, Any]] = field(default_factory=list)
    memory_rows: list[dict[str, Any]] = field(default_factory=list)
    qualities: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)

    def speed(self, what: str, cellvi_s: float, original_s: float | None, clock: str = "wall") -> None:
        """A time of cellvi and of the original (``None`` if the original fails) for the same work."""
        ratio = None if original_s is None or cellvi_s <= 0 else original_s / cellvi_s
        self.speeds.append(
            {"what": what, "clock": clock, "cellvi_s": cellvi_s, "original_s": original_s, "ratio": ratio}
        )

    def memory(self, what: str, cellvi_mb: float, original_mb: float | None) -> None:
        """Peak memory growth (MiB) of cellvi and of the original for the same work."""
        self.memory_rows.append({"what": what, "cellvi_mb": cellvi_mb, "original_mb": original_mb})

    def quality(
        self,
        metric: str,
        cellvi: float,
        original: float | None,
        better: str = "higher",
        tolerance: float = 0.0,
    ) -> None:
        """A ground-truth quality metric; ``better`` is ``"higher"`` or ``"lower"``.

        ``tolerance``: the resolution of the measure; cellvi counts as at least as good when it is
        worse by less than that (shown as a tie in the table).
        """
        if better not in ("higher", "lower"):
            raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        row = {"metric": metric, "cellvi": cellvi, "original": original, "better": better}
        if tolerance:
            row["tolerance"] = tolerance
        self.qualities.append(row)

    def note(self, text: str) -> None:
        """A line shown under the model's table (e.g. what the original could not do)."""
        self.notes.append(text)

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A free-form table shown under the model's figures (``rows``: lists of ``len(columns)`` cells)."""
        if any(len(row) != len(columns) for row in rows):
            raise ValueError(f"every row of table {title!r} must have {len(columns)} cells")
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows]})

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "speed": self.speeds,
            "memory": self.memory_rows,
            "quality": self.qualities,
            "notes": self.notes,
            "tables": self.tables,
            "meta": run_metadata(),
        }

    def write(self, path: str | os.PathLike | None) -> None:
        """Write the report as JSON to ``path`` atomically (nothing is written when ``path`` is None)."""
        if path is None:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=2, default=float)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the figures from other users
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _short_path(arg: str) -> str:
    """``arg`` relative to the working directory when it is a path below it (readable commands)."""
    if os.path.isabs(arg) and arg.startswith(os.getcwd() + os.sep):
        return os.path.relpath(arg)
    return arg


def run_metadata() -> dict[str, Any]:
    """When, how and where this process ran: UTC date, command line, cores, CPU, torch threads, GPU.

    Torch figures are read only if this process has imported torch (importing it here would cost seconds).
    """
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([_short_path(sys.executable), *map(_short_path, sys.argv)]),
        "cwd": os.getcwd(),
        "cpu_cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        meta["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            meta["torch"] = torch.__version__
            meta["torch_threads"] = torch.get_num_threads()
            cuda = torch.cuda.is_available()
            meta["gpu"] = torch.cuda.get_device_name(0) if cuda else None
        except Exception as err:  # noqa: BLE001 - metadata must never make a benchmark fail
            meta["torch_error"] = repr(err)
    return meta


def add_json_argument(parser) -> None:
    """Add ``--json PATH`` to a benchmark's argument parser."""
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
