"""The ``cellvi fadvi`` command: a thin wrapper writing embeddings and predictions atomically."""

from __future__ import annotations

import anndata as ad
import numpy as np

from cellvi._cli import main
from cellvi._io import write_h5ad
from cellvi.data import simulate_batches


def test_cli_writes_embeddings_and_predictions(tmp_path, capsys):
    adata = simulate_batches(n_cells=300, n_genes=60, n_batches=2, n_labels=3, seed=4)
    del adata.layers["log_mean_batch_free"]
    src = write_h5ad(adata, tmp_path / "in.h5ad")
    out = tmp_path / "out.h5ad"
    rc = main([
        "fadvi", str(src), "-o", str(out), "--labels-key", "labels", "--batch-key", "batch",
        "--max-epochs", "3", "--quiet", "--no-evaluate", "--save-model", str(tmp_path / "model"),
    ])
    assert rc == 0
    res = ad.read_h5ad(out)
    assert res.obsm["X_fadvi_l"].shape == (300, 30) and res.obsm["X_fadvi_r"].shape == (300, 10)
    assert set(res.obs["fadvi_prediction"].astype(str)) <= {"type_0", "type_1", "type_2"}
    assert np.all((res.obs["fadvi_confidence"] > 0) & (res.obs["fadvi_confidence"] <= 1))
    assert (tmp_path / "model" / "model.pt").exists()
    # refuses to overwrite; a missing key is a clear error, exit code 2
    assert main(["fadvi", str(src), "-o", str(out), "--labels-key", "labels", "--quiet"]) == 2
    assert main(["fadvi", str(src), "-o", str(tmp_path / "o2.h5ad"), "--labels-key", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "labels_key='nope'" in err
