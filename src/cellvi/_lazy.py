"""Public names of a package imported on first use (PEP 562), so that ``import cellvi`` and
``cellvi <model> --help`` do not pay for torch, Lightning and scvi-tools."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(
    package: str, attributes: Mapping[str, str], modules: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    ``attributes`` maps a public name to the module that defines it under the same name;
    ``modules`` maps a public name to a module that is itself the value. A resolved name is
    stored on the package, so each is imported once.
    """
    attributes, modules = dict(attributes), dict(modules or {})

    def __getattr__(name: str) -> Any:
        if name in attributes:
            value = getattr(import_module(attributes[name]), name)
        elif name in modules:
            value = import_module(modules[name])
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *attributes, *modules})

    return __getattr__, __dir__
