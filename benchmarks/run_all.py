"""Run every benchmark (cellvi against the original, same data and settings) and build the results table.

Each benchmark runs as a subprocess, ``benchmarks/<name>.py --json <out>/<name>.json`` at its defaults
(or with ``--quick``: the small settings of ``QUICK`` below), its output streamed and kept in
``<out>/<name>.log``; then ``<out>/TABLE.md`` is rebuilt from every JSON present. ``<out>`` is
``benchmarks/results`` (``benchmarks/results/quick`` with ``--quick``, so quick figures never replace
full ones). Usage::

    .venv/bin/python benchmarks/run_all.py                      # everything at defaults (scaling.py alone ~20 min)
    .venv/bin/python benchmarks/run_all.py --only scar scaling  # some of them
    .venv/bin/python benchmarks/run_all.py --quick              # small settings (~6 min on 2 shared cores)
    .venv/bin/python benchmarks/run_all.py --render             # only rebuild TABLE.md from the JSONs

The benchmark lock: ``run_all.py`` takes ``flock /tmp/cellvi-bench.lock`` itself, once, for the whole run,
and tells its children it holds it (``CELLVI_BENCH_LOCK_HELD=1`` in their environment). When it is itself
started under ``flock /tmp/cellvi-bench.lock ...``, pass ``--no-lock`` (or set that variable).

``TABLE.md`` has one section per benchmark: speed ratios (original / cellvi, with the clock), peak
memory growth, ground-truth quality metrics with their direction and whether cellvi is at least as good,
the settings, the command that produced the JSON, its date and the machine (cores, torch threads,
CPU / GPU). A benchmark without a JSON is listed as "not run". ``<out>/<name>.notes.md``, where present, is shown
under the benchmark's figures as hand-written annotations (what a figure means, what was checked after).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import at_least_as_good

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = "/tmp/cellvi-bench.lock"
LOCK_ENV = "CELLVI_BENCH_LOCK_HELD"

# name -> what it compares; every one is benchmarks/<name>.py and accepts --json PATH
BENCHMARKS = {
    "scar": "cellvi.SCAR vs scvi.external.SCAR",
    "velovi": "cellvi.VELOVI vs scvi.external.VELOVI",
    "fadvi": "cellvi.FADVI vs fadvi 0.3.0",
    "amici": "cellvi.AMICI vs amici-st 0.1.0",
    "amici_interpretation": "cellvi.interpretation vs amici-st 0.1.0",
    "dataloading": "cellvi data path vs scvi-tools AnnDataLoader",
    "scaling": "time per epoch from 10k to 100k cells",
}
# --quick: small settings (minutes in all), for checking that everything runs
QUICK = {
    "scar": ["--n-cells", "500", "--n-genes", "500", "--n-empty", "3000", "--epochs", "10"],
    "velovi": ["--n-obs", "300", "--max-epochs", "20", "--n-samples", "5", "--uncertainty-samples", "5"],
    "fadvi": ["--n-cells", "600", "--n-genes", "200", "--epochs", "3"],
    "amici": ["--n-cells", "600", "--epochs", "2"],
    "amici_interpretation": ["--n-cells", "600", "--epochs", "1"],
    "dataloading": ["--sizes", "5000", "--repeats", "1"],
    "scaling": ["--sizes", "1000", "3000", "--max-batches", "10"],
}
STATUS_FILE = "run_all.json"


# ------------------------------------------------------------------------------------------------ run
def take_lock(no_lock: bool):
    """Hold the benchmark lock (``flock(2)``, the same lock as ``flock(1)``) unless told it is held."""
    if no_lock or os.environ.get(LOCK_ENV):
        return None
    fh = open(LOCK, "a")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for {LOCK} ...", flush=True)
        fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def run_one(name: str, out: Path, quick: bool, timeout: float | None) -> dict:
    """Run ``benchmarks/<name>.py --json <out>/<name>.json``; returns its status for ``run_all.json``."""

    def short(path) -> str:  # relative to the repository (the children run there): readable commands
        path = Path(path)
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    json_path = short(out / f"{name}.json")
    cmd = [sys.executable, short(HERE / f"{name}.py"), *(QUICK[name] if quick else []), "--json", json_path]
    shown = shlex.join([short(sys.executable), *cmd[1:]])
    env = {**os.environ, LOCK_ENV: "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    print(f"\n=== {name}: {shown}", flush=True)
    start, started_at = time.perf_counter(), time.time()
    status = {"command": shown, "started": _now()}
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        killer = None if timeout is None else threading.Timer(timeout, proc.kill)
        if killer is not None:
            killer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(f"  {line}")
            log.write(line)
        rc = proc.wait()
        if killer is not None:
            killer.cancel()
    status.update(returncode=rc, seconds=round(time.perf_counter() - start, 1))
    written = out / f"{name}.json"
    status["ok"] = rc == 0 and written.exists() and written.stat().st_mtime >= started_at
    print(
        f"=== {name}: {'ok' if status['ok'] else f'FAILED (exit {rc})'} in {status['seconds']:.0f}s",
        flush=True,
    )
    return status


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------------------------- render
def _num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, int) or x == 0:
        return f"{x:,}" if isinstance(x, int) else "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def _ratio(r) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _md_table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |")
    return lines


def _is_tie(q: dict) -> bool:
    """At least as good only thanks to the row's tolerance (the resolution of the measure)."""
    c, o, tol = q.get("cellvi"), q.get("original"), q.get("tolerance", 0.0)
    if not tol or at_least_as_good(q) is not True:
        return False
    return c < o if q.get("better", "higher") == "higher" else c > o


def _machine(meta: dict, settings: dict | None = None) -> str:
    if not meta:
        return "not recorded"
    if "torch_threads" not in meta and settings and "threads" in settings:
        # the process that wrote the JSON did not import torch (its workers did): their setting
        meta = {**meta, "torch_threads": f"{settings['threads']} (the benchmark's setting, per worker)"}
    cores = meta.get("cpu_cores")
    usable = meta.get("cpu_cores_usable")
    parts = [f"{cores} CPU cores" + (f" ({usable} usable)" if usable not in (None, cores) else "")]
    if meta.get("cpu_model"):
        parts[0] += f", {meta['cpu_model']}"
    parts.append(
        f"torch threads {meta['torch_threads']}" if "torch_threads" in meta else "torch threads not recorded"
    )
    if "gpu" in meta:
        parts.append(f"GPU {meta['gpu']}" if meta["gpu"] else "CPU only (no CUDA device)")
    else:
        parts.append("GPU not recorded")
    if meta.get("torch"):
        parts.append(f"torch {meta['torch']}")
    return "; ".join(parts)


def _settings(settings: dict) -> str:
    return (
        ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()) or "—"
    )


def render(out: Path) -> str:
    """``TABLE.md`` from the JSONs in ``out`` (missing ones listed as not run)."""
    status = {}
    if (out / STATUS_FILE).exists():
        status = json.loads((out / STATUS_FILE).read_text())
    names = list(BENCHMARKS) + sorted(
        p.stem for p in out.glob("*.json") if p.stem not in BENCHMARKS and p.name != STATUS_FILE
    )
    reports = {}
    for name in names:
        path = out / f"{name}.json"
        if path.exists():
            try:
                reports[name] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                reports[name] = {"_error": f"unreadable JSON ({err})"}
    where = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    intro = (
        f"Rendered {_now()} by `.venv/bin/python benchmarks/run_all.py --render` from the JSONs in `{where}/`. "
        "Regenerate everything with `.venv/bin/python benchmarks/run_all.py` (see `benchmarks/README.md`). "
        "Speed ratios are original / cellvi of the same work in the same run (> 1: cellvi is faster); memory "
        "is the peak resident-set growth (MiB) of the call; quality is against the simulated ground truth."
    )
    lines = [
        "# cellvi benchmarks",
        "",
        intro,
        "",
        "## Summary",
        "",
    ]
    summary = []
    for name in names:
        rep = reports.get(name)
        what = BENCHMARKS.get(name, "")
        if rep is None:
            summary.append([name, what, "**not run**", "—", "—", "—"])
            continue
        if "_error" in rep:
            summary.append([name, what, rep["_error"], "—", "—", "—"])
            continue
        ratios = [s["ratio"] for s in rep.get("speed", []) if s.get("ratio") is not None]
        speed = "—" if not ratios else (
            f"{min(ratios):.2f}x" if len(ratios) == 1 else f"{min(ratios):.2f}x – {max(ratios):.2f}x ({len(ratios)} rows)"
        )  # fmt: skip
        marks = [at_least_as_good(q) for q in rep.get("quality", [])]
        judged = [m for m in marks if m is not None]
        quality = "—" if not judged else f"{sum(judged)}/{len(judged)}"
        date = rep.get("meta", {}).get("date") or "not recorded"
        st = status.get(name)
        failed_after = st and not st.get("ok") and st.get("started", "") > rep.get("meta", {}).get("date", "")
        summary.append(
            [name, what, "ran (a later attempt failed)" if failed_after else "ran", date, speed, quality]
        )
    lines += _md_table(
        [
            "benchmark",
            "compares",
            "status",
            "date",
            "speed original/cellvi (min – max)",
            "quality: cellvi at least as good",
        ],
        summary,
    )
    for name in names:
        rep = reports.get(name)
        lines += ["", f"## {name}", ""]
        st = status.get(name)
        if rep is None or "_error" in rep:
            lines.append("**not run**" + (f" ({rep['_error']})" if rep else "") + ".")
            if st and not st.get("ok"):
                lines.append(
                    f"Last attempt by run_all.py {st['started']}: exit {st['returncode']} (`{st['command']}`)."
                )
            continue
        meta = rep.get("meta", {})
        lines.append(f"- command: `{meta['command']}`" if meta.get("command") else "- command: not recorded")
        lines.append(f"- date: {meta.get('date', 'not recorded')}")
        lines.append(f"- machine: {_machine(meta, rep.get('settings'))}")
        lines.append(f"- settings: {_settings(rep.get('settings', {}))}")
        if st and not st.get("ok") and st.get("started", "") > meta.get("date", ""):
            lines.append(
                f"- **the last run_all.py attempt ({st['started']}, exit {st['returncode']}) failed; the figures "
                "below are from the date above**"
            )
        if rep.get("speed"):
            lines += ["", "Speed (seconds; ratio original / cellvi, > 1: cellvi faster):", ""]
            lines += _md_table(
                ["what", "clock", "original s", "cellvi s", "original / cellvi"],
                [[s["what"], s.get("clock", "wall"), s.get("original_s"), s.get("cellvi_s"), _ratio(s.get("ratio"))]
                 for s in rep["speed"]],
            )  # fmt: skip
        if rep.get("memory"):
            lines += ["", "Peak memory growth (MiB):", ""]
            lines += _md_table(
                ["what", "original MiB", "cellvi MiB"],
                [[m["what"], m.get("original_mb"), m.get("cellvi_mb")] for m in rep["memory"]],
            )
        if rep.get("quality"):
            lines += ["", "Quality against the ground truth:", ""]
            rows = []
            for q in rep["quality"]:
                mark = at_least_as_good(q)
                rows.append([q["metric"], f"{q.get('better', 'higher')} is better", _num(q.get("original"), 4),
                             _num(q.get("cellvi"), 4),
                             "—" if mark is None else (
                                 f"tie (within {q['tolerance']:g})" if _is_tie(q) else "yes" if mark else "**no**"
                             )])  # fmt: skip
            lines += _md_table(["metric", "direction", "original", "cellvi", "cellvi at least as good"], rows)
        for table in rep.get("tables", []):
            lines += ["", f"{table['title']}:", ""]
            lines += _md_table(table["columns"], table["rows"])
        if rep.get("notes"):
            lines += ["", "Notes:", ""]
            lines += [f"- {n}" for n in rep["notes"]]
        annotations = out / f"{name}.notes.md"
        if annotations.exists():
            lines += ["", f"Annotations (written by hand after the run, `{annotations.name}`):", ""]
            lines += annotations.read_text().rstrip().splitlines()
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help=f"some of {list(BENCHMARKS)}"
    )
    p.add_argument("--quick", action="store_true", help="small settings (see QUICK); results in <out>/quick")
    p.add_argument("--render", action="store_true", help="only rebuild TABLE.md from the JSONs present")
    p.add_argument(
        "--out", type=Path, default=None, help="results folder (default benchmarks/results[/quick])"
    )
    p.add_argument("--no-lock", action="store_true", help=f"the caller already holds {LOCK}")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a benchmark is stopped")
    args = p.parse_args(argv)
    out = args.out or (HERE / "results" / ("quick" if args.quick else ""))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        lock = take_lock(args.no_lock)
        status_path = out / STATUS_FILE
        try:
            for name in args.only or list(BENCHMARKS):
                st = run_one(name, out, args.quick, args.timeout)
                status = json.loads(status_path.read_text()) if status_path.exists() else {}
                status[name] = st
                status_path.write_text(json.dumps(status, indent=2))
        finally:
            if lock is not None:
                lock.close()
    table = render(out)
    (out / "TABLE.md").write_text(table)
    print(f"\nwrote {out / 'TABLE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
