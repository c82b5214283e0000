"""Shared plot finishing: save (atomically) on request, log to Weights & Biases if asked, show or close."""

from __future__ import annotations

from pathlib import Path

_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 4.0, height: float = 3.2, **kwargs):
    """A pyplot figure with a grid of axes (``squeeze=False``)."""
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)


def finish_figure(
    fig,
    name: str,
    *,
    show: bool = True,
    save_png: bool = False,
    save_svg: bool = False,
    save_dir: str | Path = "./figures",
    wandb_log: bool = False,
    epoch: int | None = None,
):
    """Save, log and show (or close) ``fig``; return it.

    ``save_png`` / ``save_svg`` write ``save_dir/<name>.png|svg`` atomically. ``wandb_log`` logs the
    figure to the active Weights & Biases run (``step=epoch``) and needs the ``wandb`` package.
    ``show`` displays the figure with an interactive backend; otherwise the figure is released from
    pyplot's registry (the returned object stays usable, e.g. ``fig.savefig``).
    """
    import matplotlib
    import matplotlib.pyplot as plt

    from cellvi._io import atomic_path

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    for flag, ext in ((save_png, "png"), (save_svg, "svg")):
        if flag:
            with atomic_path(Path(save_dir) / f"{safe}.{ext}") as tmp:
                fig.savefig(tmp, format=ext, bbox_inches="tight", dpi=150 if ext == "png" else None)
    if wandb_log:
        try:
            import wandb
        except ImportError as err:
            raise ValueError("wandb_log=True needs the wandb package (pip install wandb).") from err
        wandb.log({name: wandb.Image(fig)}, step=epoch)
    backend = matplotlib.get_backend().lower()
    if show and backend not in _NON_INTERACTIVE:
        plt.show()
    else:
        plt.close(fig)
    return fig


def palette_for(names, palette=None) -> dict:
    """A ``{name: colour}`` mapping from a seaborn palette name, a list of colours or a dict."""
    import seaborn as sns

    names = list(names)
    if isinstance(palette, dict):
        missing = [n for n in names if n not in palette]
        if missing:
            raise ValueError(f"palette has no colour for {missing}.")
        return {n: palette[n] for n in names}
    colours = sns.color_palette(palette if palette is not None else "tab10", n_colors=max(len(names), 1))
    return dict(zip(names, colours, strict=False))
