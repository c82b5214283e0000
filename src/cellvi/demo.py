"""``python -m cellvi.demo``: every model's main job on simulated data, with a short summary each.

Each model package has a ``_demo`` module with ``run(out_dir, quick)`` that simulates data with
:mod:`cellvi.data`, trains the model, prints a before/after summary and writes its outputs under
``out_dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import import_module
from pathlib import Path

SECTIONS: tuple[str, ...] = (
    "scar",
    "amici",
    "interpretation",
    "velovi",
    "fadvi",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellvi.demo", description=__doc__)
    parser.add_argument("--out", default="demo_output", help="folder for the outputs (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    for name in args.only or SECTIONS:
        print(f"\n=== cellvi demo: {name} ===", flush=True)
        t0 = time.perf_counter()
        import_module(f"cellvi.{name}._demo").run(Path(args.out) / name, quick=args.quick)
        print(f"--- {name} done in {time.perf_counter() - t0:.1f}s; outputs in {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
