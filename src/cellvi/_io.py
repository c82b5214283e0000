"""Reading inputs and writing outputs safely (atomic writes: nothing half-written survives a crash)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True):
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and directories. A crash or exception leaves ``path`` as it was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = tmp_dir / (path.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_h5ad(adata, path: str | os.PathLike, **kwargs) -> Path:
    """Write ``adata`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, **kwargs)
    return Path(path)


def read_anndata(path: str | os.PathLike, arg: str = "path"):
    """Read an h5ad file, a 10x h5 file or a 10x mtx directory into AnnData.

    Raises a :class:`ValueError` naming ``arg`` when the path is missing, of an unknown kind, or
    cannot be read (a truncated or corrupt file: one line with the reader's own reason).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{arg}: {p} does not exist.")
    try:
        return _read_any(p, arg)
    except Exception as err:
        if isinstance(err, ValueError) and str(err).startswith(f"{arg}:"):
            raise  # h5py / anndata / scanpy raise OSError, KeyError, TypeError ... on bad files
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{arg}: cannot read {p} ({type(err).__name__}: {first})") from err


def _read_any(p: Path, arg: str):
    import anndata as ad
    import scanpy as sc

    if p.is_dir():
        if any((p / n).exists() for n in ("matrix.mtx", "matrix.mtx.gz")):
            return sc.read_10x_mtx(p, var_names="gene_symbols", make_unique=True)
        raise ValueError(f"{arg}: directory {p} holds no matrix.mtx(.gz); expected a 10x mtx directory.")
    suffix = "".join(p.suffixes[-2:]) if p.name.endswith(".gz") else p.suffix
    if suffix == ".h5ad":
        return ad.read_h5ad(p)
    if suffix == ".h5":
        adata = sc.read_10x_h5(p)
        adata.var_names_make_unique()
        return adata
    if suffix in (".mtx", ".mtx.gz"):
        return _read_any(p.parent, arg)
    raise ValueError(f"{arg}: {p} is not a .h5ad, 10x .h5 file or 10x mtx directory.")
