import subprocess
import sys

import numpy as np
import pytest
from scipy import sparse

import cellvi
from cellvi._cli import main


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda X: X.__setitem__((0, 0), 1.5), r"adata.X contains non-integer values"),
        (lambda X: X.__setitem__((1, 1), -1.0), r"adata.X contains negative values"),
        (lambda X: X.__setitem__((2, 2), np.nan), r"adata.X contains NaN"),
        (lambda X: X.__setitem__(3, 0.0), r"adata.X has 1 cell\(s\) with zero total counts \(cell_3\)"),
    ],
)
def test_bad_counts(small, edit, match):
    adata, _ = small()
    adata.X = adata.X.toarray()
    edit(adata.X)
    before = adata.X.copy()
    with pytest.raises(ValueError, match=match):
        cellvi.SCAR.setup_anndata(adata)
    np.testing.assert_array_equal(adata.X, before)


def test_bad_ambient_profile(small):
    adata, _ = small()
    cellvi.SCAR.setup_anndata(adata)
    with pytest.raises(ValueError, match=r"ambient_profile has shape \(39, 1\); expected 40 genes"):
        cellvi.SCAR(adata, ambient_profile=np.full(39, 1 / 39))
    with pytest.raises(ValueError, match=r"ambient_profile does not sum to a positive value"):
        cellvi.SCAR(adata, ambient_profile=np.zeros(40))
    with pytest.raises(ValueError, match=r"ambient_profile contains NaN"):
        cellvi.SCAR(adata, ambient_profile=np.full(40, np.nan))
    with pytest.raises(ValueError, match=r"is not a key of adata.varm"):
        cellvi.SCAR(adata, ambient_profile="nope")
    with pytest.warns(UserWarning, match="mean of the cells"):
        cellvi.SCAR(adata)


def test_user_data_unchanged(small):
    adata, raw = small()
    X0, raw0 = adata.X.copy(), raw.X.copy()
    cellvi.SCAR.setup_anndata(adata)
    prof = cellvi.SCAR.get_ambient_profile(adata, raw)
    model = cellvi.SCAR(adata, ambient_profile=prof)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.get_denoised_counts()
    assert (adata.X != X0).nnz == 0 and (raw.X != raw0).nnz == 0
    assert sparse.issparse(adata.X)


def test_guide_assignment():
    adata, raw = cellvi.data.simulate_ambient(
        n_cells=400, n_genes=15, n_empty=3000, modality="guides", seed=0
    )
    cellvi.SCAR.setup_anndata(adata)
    cellvi.SCAR.get_ambient_profile(adata, raw)
    model = cellvi.SCAR(adata, sparsity=1.0)
    model.train(max_epochs=60, enable_progress_bar=False)
    res, bf = model.assign_features(return_bayes_factors=True)
    assert res.index.equals(adata.obs_names) and bf.shape == adata.shape
    assert res["n_features"].dtype == np.int64
    truth = adata.obs["guide"].astype(str)
    single = (truth != "") & ~truth.str.contains(r"\+")
    assert (res["feature"][single] == truth[single]).mean() > 0.95
    doublet = truth.str.contains(r"\+")
    # doublets: the assigned guides are among the two true ones
    hit = [
        f != "" and set(f.split("+")) <= set(t.split("+"))
        for f, t in zip(res["feature"][doublet], truth[doublet], strict=True)
    ]
    assert np.mean(hit) > 0.8
    with pytest.raises(ValueError, match="adjust"):
        model.assign_features(adjust="macro")


def test_cli_end_to_end(tmp_path, capsys):
    adata, raw = cellvi.data.simulate_ambient(n_cells=150, n_genes=50, n_empty=1500, seed=0)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    raw.write_h5ad(tmp_path / "raw.h5ad")
    out = tmp_path / "out.h5ad"
    args = ["scar", str(tmp_path / "cells.h5ad"), str(tmp_path / "raw.h5ad"), "-o", str(out)]
    args += ["--max-epochs", "2", "-q"]
    rc = main(args)
    assert rc == 0
    import anndata as ad

    res = ad.read_h5ad(out)
    assert sparse.issparse(res.layers["denoised"]) and res.layers["denoised"].shape == adata.shape
    assert "contamination" in res.obs and res.varm["ambient_profile"].shape == (50, 1)
    assert (res.layers["denoised"].toarray() <= adata.X.toarray()).all()
    # --threshold reaches get_denoised_counts: 0.999 removes (almost) nothing the default removes
    rc = main([*args[:4], str(tmp_path / "strict.h5ad"), *args[5:], "--threshold", "0.999"])
    strict = ad.read_h5ad(tmp_path / "strict.h5ad").layers["denoised"]
    assert rc == 0 and strict.sum() > res.layers["denoised"].sum()
    rc = main([*args[:4], str(tmp_path / "y.h5ad"), *args[5:], "--threshold", "most"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--threshold" in err[0] and not (tmp_path / "y.h5ad").exists()
    # bad input: one-line reason and exit code 2, nothing written
    rc = main(
        ["scar", str(tmp_path / "cells.h5ad"), str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "x.h5ad")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "raw" in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "x.h5ad").exists()


def test_cli_help_reads_like_the_reference():
    import argparse

    code = "import sys, cellvi.scar._cli; sys.exit(0 if 'torch' not in sys.modules else 1)"
    assert (
        subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    )  # --help does not import torch
    from cellvi.scar._cli import add_parser

    parser = add_parser(argparse.ArgumentParser(prog="cellvi").add_subparsers())
    text = parser.format_help()
    for word in (
        "--gene-likelihood",
        "--prob",
        "--min-raw-counts",
        "--batch-key",
        "contamination",
        "denoised",
    ):
        assert word in text


def test_cli_bad_input_exits_with_one_line(tmp_path, capsys):
    """An unreadable file and data that fail validation: exit 2, exactly one line on stderr, nothing written."""
    (tmp_path / "broken.h5ad").write_text("not an h5ad file")
    adata, raw = cellvi.data.simulate_ambient(n_cells=60, n_genes=20, n_empty=300, seed=0)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    raw[:, 3:].copy().write_h5ad(tmp_path / "raw_fewer_genes.h5ad")
    rc = main(
        ["scar", str(tmp_path / "broken.h5ad"), str(tmp_path / "cells.h5ad"), "-o", str(tmp_path / "o.h5ad")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "filtered: cannot read" in err[0] and "broken.h5ad" in err[0]
    # in a real process (Lightning's loggers write to the real stderr): the seed line is not printed either
    out = tmp_path / "o.h5ad"
    cmd = [
        sys.executable,
        "-m",
        "cellvi",
        "scar",
        str(tmp_path / "cells.h5ad"),
        str(tmp_path / "raw_fewer_genes.h5ad"),
        "-o",
        str(out),
        "-q",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "raw_adata lacks 3 of the 20 genes" in lines[0] and not out.exists()
