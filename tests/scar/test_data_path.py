"""SCAR on cellvi's data path, and the Binomial constant registered per cell at setup."""

import numpy as np
import pytest
import scvi
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS

import cellvi
from cellvi.scar._components import AmbientBinomial, LogFactorial
from cellvi.scar._fields import LOG_BINOM_KEY, LOG_BINOM_OBS, log_binomial_constant


def _per_gene_sum(X) -> np.ndarray:
    """``sum_g log C(n, x_g)`` evaluated on every (dense) entry, as the per-gene likelihood does."""
    x = torch.as_tensor(np.asarray(X.toarray() if sparse.issparse(X) else X), dtype=torch.float64)
    n = x.sum(-1, keepdim=True)
    return (torch.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)).sum(-1).numpy()


def test_per_cell_constant_equals_per_gene_sum(small):
    adata, _ = small(n_cells=150, n_genes=60, seed=3)
    expected = _per_gene_sum(adata.X)
    np.testing.assert_allclose(log_binomial_constant(adata.X), expected, rtol=1e-10)
    dense = np.asarray(adata.X.toarray() if sparse.issparse(adata.X) else adata.X)
    np.testing.assert_allclose(log_binomial_constant(dense), expected, rtol=1e-10)
    np.testing.assert_allclose(log_binomial_constant(sparse.csr_matrix(dense)), expected, rtol=1e-10)
    # one non-zero gene: log C(n, n) = 0; counts (2, 1): log C(3, 2) + log C(3, 1) = 2 log 3
    one = sparse.csr_matrix(np.array([[0, 7, 0], [2, 1, 0]], dtype=np.float32))
    np.testing.assert_allclose(log_binomial_constant(one), [0.0, 2 * np.log(3.0)], atol=1e-12)


def test_setup_registers_constant_and_loss_is_unchanged(small):
    adata, raw = small(n_cells=150, n_genes=60, seed=4)
    adata.layers["counts"] = adata.X.copy()
    cellvi.SCAR.setup_anndata(adata, layer="counts")
    np.testing.assert_allclose(adata.obs[LOG_BINOM_OBS].to_numpy(), _per_gene_sum(adata.layers["counts"]), rtol=1e-10)
    cellvi.SCAR.get_ambient_profile(adata, raw)
    scvi.settings.seed = 0
    model = cellvi.SCAR(adata)
    model.module.eval()
    loader = model._make_data_loader(adata=adata, batch_size=64)
    tensors = next(iter(loader))
    assert LOG_BINOM_KEY in tensors
    without = {k: v for k, v in tensors.items() if k != LOG_BINOM_KEY}
    torch.manual_seed(0)
    _, _, with_const = model.module(tensors)
    torch.manual_seed(0)
    _, _, per_gene = model.module(without)
    torch.testing.assert_close(
        with_const.reconstruction_loss["reconstruction_loss"],
        per_gene.reconstruction_loss["reconstruction_loss"],
        rtol=1e-6,
        atol=1e-3,
    )
    # the constant matters: dropping it changes the loss by exactly its value
    x = tensors[REGISTRY_KEYS.X_KEY]
    px = AmbientBinomial(torch.full_like(x, 1 / x.shape[1]), torch.full((x.shape[0], 1), 0.1), torch.full_like(x, 1 / x.shape[1]), x.sum(-1, keepdim=True))
    px.log_factorial = LogFactorial()
    zero = px.log_prob_sum(x, torch.zeros(x.shape[0], 1))
    torch.testing.assert_close(px.log_prob_sum(x) - zero, tensors[LOG_BINOM_KEY].reshape(-1), rtol=1e-6, atol=1e-3)
    # a new AnnData gets its own constant when transferred
    other, _ = small(n_cells=90, n_genes=60, seed=5)
    other.layers["counts"] = other.X.copy()
    model._validate_anndata(other)
    np.testing.assert_allclose(other.obs[LOG_BINOM_OBS].to_numpy(), _per_gene_sum(other.layers["counts"]), rtol=1e-10)


@pytest.fixture(scope="module")
def adata_setup():
    adata, raw = cellvi.data.simulate_ambient(n_cells=200, n_genes=80, n_empty=1000, n_damaged=10, seed=6)
    cellvi.SCAR.setup_anndata(adata)
    cellvi.SCAR.get_ambient_profile(adata, raw)
    return adata


def test_data_path_device_and_scvi_train_identically(adata_setup):
    history = {}
    for data_path in ("device", "scvi"):
        scvi.settings.seed = 0
        model = cellvi.SCAR(adata_setup)
        model.train(max_epochs=3, batch_size=64, enable_progress_bar=False, data_path=data_path)
        history[data_path] = model.history["elbo_train"].to_numpy().ravel().astype(float)
    assert np.all(np.isfinite(history["device"]))
    assert history["device"][-1] < history["device"][0]
    np.testing.assert_array_equal(history["device"], history["scvi"])


def test_data_path_rejects_unknown(adata_setup):
    model = cellvi.SCAR(adata_setup)
    with pytest.raises(ValueError, match="data_path"):
        model.train(max_epochs=1, enable_progress_bar=False, data_path="nope")


@pytest.mark.parametrize("shape", [(6, 9), (3, 6, 9)])
def test_binomial_kernel_value_and_gradient(shape):
    """The fused Binomial term equals the composed expression, and so does its hand-written gradient."""
    from cellvi.scar._components import _EPS, _BinomialKernel

    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64), -1).requires_grad_()
    x = torch.poisson(torch.full(shape[-2:], 3.0, dtype=torch.float64), generator=gen)
    n = x.sum(-1, keepdim=True).expand(*shape[:-1], 1)

    def composed(p):
        return (x * torch.log(p + _EPS) + (n - x) * torch.log1p(-p + _EPS)).sum(-1)

    out = _BinomialKernel.apply(p, x, n)
    torch.testing.assert_close(out, composed(p))
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (fused,) = torch.autograd.grad(out, p, g)
    (ref,) = torch.autograd.grad(composed(p), p, g)
    torch.testing.assert_close(fused, ref)
    assert torch.autograd.gradcheck(lambda q: _BinomialKernel.apply(q, x, n), (p,))


def test_second_train_call_trains_in_training_mode(adata_setup):
    """scvi leaves the module in eval mode; a second ``train`` must still update batch-norm statistics."""
    scvi.settings.seed = 0
    model = cellvi.SCAR(adata_setup)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    bn = next(m for m in model.module.modules() if isinstance(m, torch.nn.BatchNorm1d))
    before = bn.running_mean.clone()
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert not torch.equal(bn.running_mean, before)
    assert not model.module.training  # scvi's convention after training is kept
