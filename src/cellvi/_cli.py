"""The ``cellvi`` command line: one entry point, one thin subcommand per model.

Each model package has a ``_cli`` module with ``add_parser(subparsers)``, which registers its
subcommand and sets ``func`` (called with the parsed arguments, returns an exit code). Those
modules import the heavy libraries inside ``func`` only, so ``cellvi --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

COMMANDS: tuple[str, ...] = (
    "scar",
    "amici",
    "velovi",
    "fadvi",
)


def build_parser() -> argparse.ArgumentParser:
    import cellvi

    parser = argparse.ArgumentParser(
        prog="cellvi",
        description="Deep generative models for single-cell and spatial omics.",
    )
    parser.add_argument("--version", action="version", version=f"cellvi {cellvi.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f"cellvi.{name}._cli").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = build_parser()
    args = parser.parse_args(argv)
    # no Lightning "Seed set to N" line on stderr: a bad-input exit prints one line only
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cellvi {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        seed_log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
