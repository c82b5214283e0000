"""FADVAE's restructured computations equal the reference formulas (values and gradients, float rounding).

- ``zinb_log_prob`` (one autograd node, closed-form backward, count tables) vs the autograd formula;
- the fused encoder pass vs one :class:`~scvi.nn.Encoder` call per block (and the labelled minibatch),
  including the random stream, the whole training loss and every parameter gradient.
"""

from __future__ import annotations

import pytest
import torch
from scvi import REGISTRY_KEYS
from scvi.nn import Encoder

from cellvi.data import simulate_batches
from cellvi.fadvi import FADVI
from cellvi.fadvi._module import (
    _ZINB_TABLE,
    _fused_posteriors,
    _zinb_log_prob_reference,
    _ZINBLogProb,
    zinb_log_prob,
)


def _zinb_inputs(n=32, g=50, seed=0, theta_per_cell=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 6, generator=gen).to(dtype)
    # counts beyond the table (and one huge one) go through the direct lgamma / digamma
    x[0, :4] = torch.tensor([_ZINB_TABLE, _ZINB_TABLE + 7, 250.0, 1111.0], dtype=dtype)
    mu = (torch.rand(n, g, generator=gen, dtype=dtype) * 8 + 0.01).requires_grad_()
    shape = (n, g) if theta_per_cell else (g,)
    theta = (torch.rand(*shape, generator=gen, dtype=dtype) * 3 + 0.05).requires_grad_()
    pi = torch.randn(n, g, generator=gen, dtype=dtype).requires_grad_()
    return x, mu, theta, pi


@pytest.mark.parametrize("theta_per_cell", [False, True])
@pytest.mark.parametrize("shift", [0.0, 0.25])  # integer counts (tables) and non-integer values
def test_zinb_matches_reference_values_and_gradients(theta_per_cell, shift):
    x, mu, theta, pi = _zinb_inputs(theta_per_cell=theta_per_cell)
    x = x + shift
    weights = torch.linspace(0.5, 2.0, x.shape[-1])
    new = zinb_log_prob(x, mu, theta, pi)
    ref = _zinb_log_prob_reference(x, mu, theta, pi)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-3)
    g_new = torch.autograd.grad((new * weights).sum(), (mu, theta, pi))
    g_ref = torch.autograd.grad((ref * weights).sum(), (mu, theta, pi))
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("theta_per_cell", [False, True])
@pytest.mark.parametrize("shift", [0.0, 0.25])
def test_zinb_gradcheck_float64(theta_per_cell, shift):
    x, mu, theta, pi = _zinb_inputs(n=4, g=6, seed=1, theta_per_cell=theta_per_cell, dtype=torch.float64)
    x = x + shift
    assert torch.autograd.gradcheck(lambda m, t, p: _ZINBLogProb.apply(x, m, t, p, 1e-8), (mu, theta, pi))


def test_zinb_zero_entries_and_no_grad():
    x = torch.zeros(3, 5)
    mu, theta, pi = torch.rand(3, 5) + 0.1, torch.rand(5) + 0.1, torch.randn(3, 5)
    torch.testing.assert_close(zinb_log_prob(x, mu, theta, pi), _zinb_log_prob_reference(x, mu, theta, pi))
    # x that requires a gradient (attributions) takes the autograd formula
    xg = torch.ones(3, 5, requires_grad=True)
    zinb_log_prob(xg, mu, theta, pi).sum().backward()
    assert xg.grad is not None


def _model(n_cells=300, cat=False, **kwargs):
    adata = simulate_batches(
        n_cells=n_cells, n_genes=60, n_batches=3, n_labels=4, unlabeled_fraction=0.3, seed=0
    )
    if cat:
        adata.obs["site"] = (adata.obs_names.str[-1].astype(int) % 2).astype(str)
        adata.obs["depth"] = adata.X.sum(1).A1 if hasattr(adata.X, "toarray") else adata.X.sum(1)
    FADVI.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="labels",
        unlabeled_category="Unknown",
        categorical_covariate_keys=["site"] if cat else None,
        continuous_covariate_keys=["depth"] if cat else None,
    )
    torch.manual_seed(0)
    model = FADVI(adata, n_hidden=32, n_latent_b=6, n_latent_l=7, n_latent_r=3, **kwargs)
    return model, adata


def _batches(model, adata, n_main=48, n_lab=48):
    main = next(iter(model._make_data_loader(adata=adata, batch_size=n_main, shuffle=False)))
    lab = adata.obs["is_labeled"].to_numpy().nonzero()[0][:n_lab]
    labelled = next(iter(model._make_data_loader(adata=adata, indices=lab, batch_size=n_lab, shuffle=False)))
    return main, labelled


def test_fused_posteriors_equal_separate_encoder_calls():
    model, adata = _model(cat=True)
    mod = model.module
    main, labelled = _batches(model, adata)
    inf_in = mod._get_inference_input(main)
    fused = mod._posteriors(**inf_in, labelled=labelled)
    assert set(fused) == {"b", "l", "r", "l_labelled"}
    mod.fuse_encoders = False
    separate = mod._posteriors(**inf_in, labelled=labelled)
    assert set(separate) == {"b", "l", "r"}
    for k in ("b", "l", "r"):
        for a, b in zip(fused[k], separate[k], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the labelled pass equals a separate call of the z_l encoder
    x2 = mod._encoder_input(labelled[REGISTRY_KEYS.X_KEY], labelled.get(REGISTRY_KEYS.CONT_COVS_KEY))
    cats = (labelled[REGISTRY_KEYS.BATCH_KEY], *mod._cats(labelled.get(REGISTRY_KEYS.CAT_COVS_KEY)))
    q = mod.encoders["l"](x2, *cats)[0]
    torch.testing.assert_close(fused["l_labelled"][0], q.loc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused["l_labelled"][1], q.scale, rtol=1e-5, atol=1e-5)
    # the fused function on its own: no covariates, two layers, unequal latent sizes
    torch.manual_seed(1)
    encs = [
        Encoder(
            20,
            d,
            n_layers=2,
            n_hidden=16,
            dropout_rate=0.0,
            use_batch_norm=False,
            use_layer_norm=True,
            return_dist=True,
        )
        for d in (4, 5, 2)
    ]
    x = torch.rand(5, 20)
    for (loc, scale), enc in zip(_fused_posteriors(encs, x, None), encs, strict=True):
        q = enc(x)[0]
        torch.testing.assert_close(loc, q.loc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scale, q.scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_lab", [48, 20])  # labelled minibatch fused into the pass, or a separate call
@pytest.mark.parametrize("cat", [False, True])
def test_fused_training_step_equals_separate_calls(n_lab, cat):
    """Same loss, same random stream and the same gradient of every parameter with and without fusion.

    In float64: the encoders' mean biases get an exactly-zero gradient from the adversaries'
    group-centred (whitened) blocks, whose float32 rounding noise, amplified by the 8x
    batch-from-z_r term, reached 1e-3 of their gradient and said nothing about fusion.
    """
    model, adata = _model(cat=cat)
    mod = model.module
    mod.train()
    mod.double()
    main, labelled = (
        {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
        for b in _batches(model, adata, n_lab=n_lab)
    )
    results = {}
    for fuse in (False, True):
        mod.fuse_encoders = fuse
        torch.manual_seed(3)
        _, _, out = mod((main, labelled), loss_kwargs={"kl_weight": 0.7})
        mod.zero_grad()
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
        results[fuse] = (out.loss.detach(), grads, torch.rand(3))
    (l0, g0, r0), (l1, g1, r1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, rtol=1e-9, atol=1e-7)
    assert torch.equal(r0, r1), "the fused pass changed the random stream"
    assert g0.keys() == g1.keys()
    for name, g in g0.items():
        scale = max(float(g.abs().max()), 1e-3)
        if name.startswith("decoder.px_decoder") and name.endswith(".0.bias"):
            # a bias feeding batch norm: zero in exact arithmetic, rounding noise here
            scale = float(g0[name[: -len("bias")] + "weight"].abs().max())
        torch.testing.assert_close(g1[name], g, rtol=1e-7, atol=1e-7 * scale, msg=name)


def test_closed_form_kl_and_stacked_leak_terms_equal_the_reference():
    from torch.distributions import Normal, kl_divergence
    from torch.nn.functional import one_hot

    from cellvi.fadvi._module import _class_mean_spread, _group_whiten, _kl_unit_normal, _pad_columns

    gen = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(20, 5, generator=gen), torch.rand(20, 5, generator=gen) + 0.1
    mean = torch.randn(20, 5, generator=gen)
    torch.testing.assert_close(
        _kl_unit_normal(loc, scale, mean), kl_divergence(Normal(loc, scale), Normal(mean, 1.0))
    )
    torch.testing.assert_close(
        _kl_unit_normal(loc, scale), kl_divergence(Normal(loc, scale), Normal(0.0, 1.0))
    )

    def whiten_reference(z, group, ridge):
        # centre within groups, Cholesky-whiten by the pooled covariance plus ridge x mean variance
        means = torch.stack([z[group == g].mean(0) if (group == g).any() else z[0] * 0 for g in range(6)])
        zc = z - means[group]
        cov = zc.T @ zc / (len(z) - len(group.unique()))
        cov = cov + (ridge * cov.diagonal().mean() + 1e-6) * torch.eye(z.shape[1], dtype=z.dtype)
        return zc @ torch.linalg.inv(torch.linalg.cholesky(cov)).T

    def spread_reference(z, target, mask):
        z, target = (z, target) if mask is None else (z[mask], target[mask])
        classes = target.unique()
        if len(z) < 2 or len(classes) < 2:
            return torch.zeros((), dtype=z.dtype)
        return sum(
            (target == c).double().mean() * (z[target == c].mean(0) - z.mean(0)).pow(2).sum() for c in classes
        )

    n = 40
    blocks = [
        torch.randn(n, d, generator=gen, dtype=torch.float64)
        * torch.rand(d, generator=gen, dtype=torch.float64)
        for d in (5, 3, 2)
    ]
    groups = [torch.randint(0, k, (n,), generator=gen) for k in (3, 6, 1)]
    ohs = [one_hot(g, k).double() for g, k in zip(groups, (3, 6, 1))]
    leaves = [z.clone().requires_grad_(True) for z in blocks]
    white = _group_whiten(_pad_columns(*leaves), _pad_columns(*ohs), 1e-2, torch.tensor([5, 3, 2]))
    weights = torch.randn(white.shape, generator=gen, dtype=torch.float64)
    (white * weights).sum().backward()
    for i, (z, g) in enumerate(zip(blocks, groups)):
        d = z.shape[1]
        torch.testing.assert_close(white[i, :, :d], whiten_reference(z, g, 1e-2))
        assert float(white[i, :, d:].detach().abs().sum()) == 0.0  # padding stays zero
        # alone: the same values and gradients
        alone = z.clone().requires_grad_(True)
        single = _group_whiten(alone, ohs[i], 1e-2)
        torch.testing.assert_close(single, white[i, :, :d])
        (single * weights[i, :, :d]).sum().backward()
        torch.testing.assert_close(alone.grad, leaves[i].grad)
        # whitened within its groups, a block has nothing left between those groups (why the loss
        # takes the spread between (label, batch) cells alone)
        spread_own = _class_mean_spread(white[i, :, :d].detach(), ohs[i])
        assert abs(float(spread_own)) < 1e-12
    with pytest.raises(ValueError, match="dims"):
        _group_whiten(_pad_columns(*blocks), _pad_columns(*ohs), 1e-2)
    white = white.detach()
    # class-mean spreads, stacked, with cells left out by zero one-hot rows
    target = torch.randint(0, 4, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) > 0.3
    oh_t = one_hot(target, 4).double()
    got = _class_mean_spread(white[[0, 0, 1]], torch.stack([oh_t, oh_t * mask[:, None], oh_t]))
    want = [
        spread_reference(white[0], target, None),
        spread_reference(white[0], target, mask),
        spread_reference(white[1], target, None),
    ]
    torch.testing.assert_close(got, torch.stack(want))
    # the one-hots of registry codes, without F.one_hot's range check
    from cellvi.fadvi._module import _one_hot

    for idx in (target, target[:, None], target[:, None].float()):  # registry codes come as (n, 1) floats
        torch.testing.assert_close(_one_hot(idx, 5, torch.float64), one_hot(target, 5).double())
    # fewer than two cells, one class or no cell kept: nothing to spread
    assert float(_class_mean_spread(white[0, :1], oh_t[:1])) == 0.0
    assert float(_class_mean_spread(white[0], torch.ones(n, 1, dtype=torch.float64))) == 0.0
    assert float(_class_mean_spread(white[0], torch.zeros_like(oh_t))) == 0.0


def test_dual_head_equals_detached_and_frozen_calls():
    from cellvi.fadvi._module import _Head

    torch.manual_seed(0)
    head = _Head(6, 4, 16, 0.0)
    z = torch.randn(12, 6, requires_grad=True)
    wa, wb = torch.randn(12, 4), torch.randn(12, 4)
    ref_p, ref_z = head(z.detach()), head.frozen(z)
    ((ref_p * wa).sum() + (ref_z * wb).sum()).backward()
    ref = [z.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    z.grad = None
    head.zero_grad()
    out_p, out_z = head.dual(z)
    torch.testing.assert_close(out_p, ref_p)
    torch.testing.assert_close(out_z, ref_z)
    ((out_p * wa).sum() + (out_z * wb).sum()).backward()
    new = [z.grad] + [p.grad for p in head.parameters()]
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # float64: the gradients are those of the detached / frozen pair, not of the function itself
    # (so no gradcheck): the same comparison at a tight tolerance
    head64 = head.double()
    z64 = z.detach().double().requires_grad_()
    ref_p, ref_z = head64(z64.detach()), head64.frozen(z64)
    g_ref = torch.autograd.grad(
        (ref_p * wa.double()).sum() + (ref_z * wb.double()).sum(), [z64, *head64.parameters()]
    )
    out_p, out_z = head64.dual(z64)
    g_new = torch.autograd.grad(
        (out_p * wa.double()).sum() + (out_z * wb.double()).sum(), [z64, *head64.parameters()]
    )
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_kernel_alignment_backward_equals_autograd():
    """The closed-form backward of the kernel alignment equals autograd through the formula (float64),
    with far-apart cells (kernel entries underflowing to zero), groups of several sizes and a cell
    left out."""
    from torch.nn.functional import one_hot

    from cellvi.fadvi import _module as M

    gen = torch.Generator().manual_seed(0)
    P, n, d = 2, 40, 5
    z = torch.randn(P, n, d, generator=gen, dtype=torch.float64)
    z[0, :8] *= 30.0
    group = torch.randint(0, 3, (P, n), generator=gen)
    group[1] = torch.where(torch.arange(n) < 3, 3, group[1].clamp(max=2))  # stack 1: a group of 3 cells
    group[0, group[0] == 2] = 3
    z[0, group[0] == 3] = z[0, group[0] == 3][0]  # stack 0: a group of identical cells (flat kernel)
    og = one_hot(group, 4).double()
    og[1, 5] = 0.0  # a cell left out
    t = one_hot(torch.randint(0, 4, (P, n), generator=gen), 4).double()
    ogt = og.transpose(-1, -2)
    counts = ogt.sum(-1)
    zs = z - og @ M._group_means(og, z, counts)
    same = og @ ogt
    n_row = same.sum(-1).clamp(min=1)
    bw = (og @ (torch.rand(P, 4, generator=gen, dtype=torch.float64) + 0.5).unsqueeze(-1)).clamp(min=1e-12)
    lc = M._centre_within(t @ t.transpose(-1, -2), same, og, n_row, counts)
    nl = M._group_sums(ogt, lc * lc)
    w = counts * ((nl > 1e-9) & (counts >= 4)).double()  # the rule of _kernel_leak
    w = w / w.sum(-1, keepdim=True)
    assert float(w[1, 3]) == 0.0 and float(w[0, 3]) > 0  # the small group is left out, the flat one kept
    args = (bw, same, n_row, og, counts, lc, nl, w)
    a, b = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    weights = torch.randn(P, generator=gen, dtype=torch.float64)
    out_a, out_b = M._KernelAlignment.apply(a, *args), M._kernel_alignment_reference(b, *args)
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert float(a.grad.abs().max()) > 1e-4
    assert torch.autograd.gradcheck(
        lambda x: M._KernelAlignment.apply(x, *args), (zs.clone().requires_grad_(True),)
    )
