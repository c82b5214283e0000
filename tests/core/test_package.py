"""Package surface: lazy imports, registries that resolve, a fast command line."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import cellvi
from cellvi import _cli, demo

SUBPACKAGES = ["scar", "velovi", "fadvi", "amici", "interpretation", "data", "dataloaders"]


def test_cli_help_does_not_import_torch():
    code = (
        "import sys, cellvi._cli as c\n"
        "c.build_parser().format_help()\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'scvi', 'scanpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`cellvi --help` imports {out.stdout.strip()}"


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_public_name_resolves(name):
    module = importlib.import_module(f"cellvi.{name}")
    for attr in module.__all__:
        assert getattr(module, attr) is not None, f"cellvi.{name}.{attr}"
    with pytest.raises(AttributeError, match="no attribute"):
        module.not_a_name  # noqa: B018


def test_registries_resolve():
    for model in ("SCAR", "VELOVI", "FADVI", "AMICI"):
        assert getattr(cellvi, model).__name__ == model
    for name in _cli.COMMANDS:
        assert callable(importlib.import_module(f"cellvi.{name}._cli").add_parser)
    for name in demo.SECTIONS:
        assert callable(importlib.import_module(f"cellvi.{name}._demo").run)


def test_test_modules_have_unique_basenames():
    # tests/ has no __init__.py files (pytest's rootdir-relative "prepend" import): two test or helper
    # modules with the same file name in different folders collide when one worker collects both
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("*.py") if p.name != "conftest.py")
    assert [n for n, c in names.items() if c > 1] == []


def test_model_packages_resolve_as_attributes_in_a_fresh_interpreter():
    code = "import cellvi; print(cellvi.velovi.preprocess_data.__name__, cellvi.amici.AMICI.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["preprocess_data", "AMICI"]
