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
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
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


@pytest.mark.parametrize(
    "command",
    [
        ["scar", "{bad}", "{bad}"],
        ["velovi", "{bad}"],
        ["fadvi", "{bad}", "--labels-key", "labels"],
        ["amici", "{bad}", "--labels-key", "cell_type"],
    ],
)
def test_every_cli_reports_an_unreadable_input_in_one_line(tmp_path, capsys, command):
    from cellvi._cli import main

    bad = tmp_path / "broken.h5ad"
    bad.write_text("not an h5ad file")
    out = tmp_path / "out.h5ad"
    rc = main([a.format(bad=bad) for a in command] + ["-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"cellvi {command[0]}: error:" in err[0] and "cannot read" in err[0] and "broken.h5ad" in err[0]
    assert not out.exists()


def test_read_anndata_names_the_argument(tmp_path):
    from cellvi._io import read_anndata

    bad = tmp_path / "x.h5"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"^raw: cannot read .*x\.h5"):
        read_anndata(bad, arg="raw")
    with pytest.raises(ValueError, match=r"^raw: .* does not exist"):
        read_anndata(tmp_path / "missing.h5ad", arg="raw")
