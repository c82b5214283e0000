"""Registry keys and fixed names of the VELOVI model."""

from __future__ import annotations

from typing import NamedTuple


class _VELOVIRegistryKeys(NamedTuple):
    X_KEY: str = "X"  # spliced abundance
    U_KEY: str = "U"  # unspliced abundance


VELOVI_REGISTRY_KEYS = _VELOVIRegistryKeys()

STATE_NAMES: tuple[str, ...] = ("induction", "induction_steady", "repression", "repression_steady")
