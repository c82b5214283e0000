import anndata as ad
import numpy as np
import pytest

from cellvi._io import atomic_path, read_anndata, write_h5ad


def test_write_h5ad_roundtrip(tmp_path):
    adata = ad.AnnData(np.arange(6, dtype=np.float32).reshape(2, 3))
    out = write_h5ad(adata, tmp_path / "a.h5ad")
    back = read_anndata(out)
    np.testing.assert_array_equal(back.X, adata.X)
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]  # no temporary left behind


def test_atomic_path_keeps_old_file_on_crash(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_replaces_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.pt").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.pt").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new.pt"]


def test_read_anndata_bad_path(tmp_path):
    with pytest.raises(ValueError, match="raw: .* does not exist"):
        read_anndata(tmp_path / "missing.h5ad", arg="raw")
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(ValueError, match="not a .h5ad"):
        read_anndata(tmp_path / "x.csv")
