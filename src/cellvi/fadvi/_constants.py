"""Names shared by the FADVI model, module and helpers."""

from __future__ import annotations

#: latent blocks, in the order they are concatenated in ``z = [z_b, z_l, z_r]``
BLOCKS: tuple[str, ...] = ("b", "l", "r")

#: accepted ``representation`` values -> blocks they hold
REPRESENTATIONS: dict[str, tuple[str, ...]] = {
    "full": ("b", "l", "r"),
    "b": ("b",),
    "batch": ("b",),
    "l": ("l",),
    "label": ("l",),
    "r": ("r",),
    "residual": ("r",),
    "lr": ("l", "r"),
    "label_residual": ("l", "r"),
}

#: accepted ``prediction_mode`` values -> the head used
PREDICTION_MODES: dict[str, str] = {"b": "batch", "batch": "batch", "l": "label", "label": "label"}
