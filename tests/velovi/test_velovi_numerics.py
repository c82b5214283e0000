"""Numerical building blocks of the VELOVI module: special functions, the Gamma sampler, dropout."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cellvi.velovi import _module as module
from cellvi.velovi._module import (
    _MaskDropout,
    dirichlet_log_rsample,
    induction_repression_rsample,
    kl_dirichlet,
    log_gamma_rsample,
    log_gamma_sample,
    mixture_log_likelihood,
)
from cellvi.velovi._special import digamma, lgamma, lgamma_digamma, lgamma_digamma_trigamma, trigamma


def _grid() -> torch.Tensor:
    return torch.cat(
        [torch.logspace(-4, 6, 4001, dtype=torch.float64), torch.linspace(0.05, 12, 500).double()]
    )


@pytest.mark.parametrize(
    ("ours", "ref", "tol"),
    [
        (lgamma, torch.lgamma, 1e-5),
        (digamma, torch.digamma, 2e-6),
        (trigamma, lambda x: torch.polygamma(1, x), 2e-6),
    ],
)
def test_special_functions_match_torch(ours, ref, tol):
    x = _grid()
    exact = ref(x)
    scale = exact.abs().clamp_min(1.0)  # relative error, absolute near the zeros
    assert ((ours(x) - exact).abs() / scale).max() < 1e-9  # float64: the series itself
    assert ((ours(x.float()).double() - exact).abs() / scale).max() < tol  # float32
    lg, dg = lgamma_digamma(x)
    assert torch.equal(lg, lgamma(x)) and torch.equal(dg, digamma(x))
    # the fused three (KL-Dirichlet's forward pass with a gradient): the same accuracy
    fused = dict(zip((lgamma, digamma, trigamma), lgamma_digamma_trigamma(x)))[ours]
    fused32 = dict(zip((lgamma, digamma, trigamma), lgamma_digamma_trigamma(x.float())))[ours]
    assert ((fused - exact).abs() / scale).max() < 1e-9
    assert ((fused32.double() - exact).abs() / scale).max() < tol


@pytest.mark.parametrize("dim", [-1, 0])
def test_kl_dirichlet_value_and_gradient(dim):
    torch.manual_seed(0)
    a = (torch.rand(7, 5, 4, dtype=torch.float64) * 5 + 0.01).requires_grad_()
    prior = 0.25
    expected = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(a), torch.distributions.Dirichlet(torch.full_like(a, prior))
    )
    got = kl_dirichlet(a, prior) if dim == -1 else kl_dirichlet(a.movedim(-1, 0), prior, dim=0)
    with torch.no_grad():  # the gradient-free forward (validation) gives the same values
        torch.testing.assert_close(kl_dirichlet(a, prior), got.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    (g_got,) = torch.autograd.grad(got.sum(), a)
    (g_exp,) = torch.autograd.grad(expected.sum(), a)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("path", ["rsample", "torch", "numpy"])
@pytest.mark.parametrize("conc", [0.02, 0.3, 1.0, 5.0])
def test_gamma_sampler_is_exact(conc, path, monkeypatch):
    # log samples against the log-Gamma law (no float underflow at small shapes): KS on 60k draws;
    # a sampler that forgot the uniform boost or the rejection step is off by far more than this tests.
    # All paths: the reparameterised one (training) and the gradient-free ones (inference: torch ops,
    # and NumPy's for the induction/repression draws on the CPU), in small chunks so that rejected
    # entries fall in many chunks
    monkeypatch.setattr(module, "_SAMPLE_CHUNK", 7_000)
    torch.manual_seed(1)
    a = torch.full((60_000,), conc, requires_grad=path == "rsample")
    if path == "numpy":
        sampler = module._NumpyGammaSampler()
        log_x = np.empty(a.numel(), dtype=np.float32)
        ok = sampler._try(a.numpy(), log_x)
        sampler._redraw(a.numpy(), log_x, np.flatnonzero(~ok))
        log_x = log_x.astype(np.float64)
    else:
        log_x = log_gamma_rsample(a).detach().double().numpy()
    assert np.isfinite(log_x).all()
    assert stats.kstest(log_x, stats.loggamma(conc).cdf).pvalue > 1e-3
    # and independent: the NumPy trial fills entries i and i + n/2 from the two coordinates of one
    # Box-Muller pair (a marginal test misses a sampler that gives both the same coordinate)
    half = log_x.size // 2
    assert abs(np.corrcoef(log_x[:half], log_x[half : 2 * half])[0, 1]) < 0.03


def test_numpy_induction_repression_draws_are_independent_within_a_block(monkeypatch):
    # the three Gammas of a cell x gene (a (3, m) block of one chunk) come from separate uniforms: their
    # log draws are uncorrelated, and so are the draws of neighbouring entries
    monkeypatch.setattr(module, "_NUMPY_SAMPLER", True)
    torch.manual_seed(3)
    sampler = module._NumpyGammaSampler()
    m = 30_000
    a = np.full(3 * m, 2.0, dtype=np.float32)
    log_x = np.empty_like(a)
    ok = sampler._try(a, log_x)
    sampler._redraw(a, log_x, np.flatnonzero(~ok))
    three = log_x.reshape(3, m).astype(np.float64)
    corr = np.corrcoef(three)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.03, corr
    assert abs(np.corrcoef(three[0, :-1], three[0, 1:])[0, 1]) < 0.03


def test_gradient_free_gamma_sampler_keeps_shape_and_stops_on_nan():
    torch.manual_seed(7)
    a = torch.rand(3, 5, 7) + 0.1
    assert log_gamma_sample(a).shape == a.shape
    a[1, 2, 3] = float("nan")  # never accepted: left NaN after the last round instead of looping forever
    out = log_gamma_sample(a)
    assert torch.isnan(out[1, 2, 3]) and torch.isfinite(out).sum() == a.numel() - 1


@pytest.mark.parametrize("numpy_sampler", [False, True])
def test_induction_repression_draws_stop_on_nan(numpy_sampler, monkeypatch):
    monkeypatch.setattr(module, "_NUMPY_SAMPLER", numpy_sampler)
    torch.manual_seed(7)
    a = torch.rand(3, 5, 4) + 0.1
    a[1, 2, 0] = float("nan")  # that entry's draws never accepted: NaN, the others finite, no endless loop
    p_ind, p_rep = induction_repression_rsample(a)
    assert p_ind.shape == p_rep.shape == (3, 5)
    assert (
        torch.isnan(p_ind[1, 2]) and torch.isfinite(p_ind).sum() == 14 and torch.isfinite(p_rep).sum() == 14
    )


def test_numpy_sampler_runs_on_cpu_float32_and_follows_torch_seed(monkeypatch):
    # float32 CPU tensors take the NumPy draws (seeded from torch's generator: torch.manual_seed fixes
    # them, and successive calls differ); other dtypes take the torch ops, and so does log_gamma_sample
    # (training's validation steps: the random stream of training is unchanged)
    a = torch.rand(6, 50, 4) + 0.2
    assert module._use_numpy_sampler(a) and not module._use_numpy_sampler(a.double())
    calls = []
    real = module._NumpyGammaSampler.induction_repression
    monkeypatch.setattr(
        module._NumpyGammaSampler, "induction_repression", lambda self, c: calls.append(1) or real(self, c)
    )
    torch.manual_seed(8)
    first = induction_repression_rsample(a)
    second = induction_repression_rsample(a)
    torch.manual_seed(8)
    again = induction_repression_rsample(a)
    assert len(calls) == 3
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(9)
    lg = log_gamma_sample(a)
    monkeypatch.setattr(module, "_NUMPY_SAMPLER", False)
    torch.manual_seed(9)
    assert torch.equal(lg, log_gamma_sample(a))  # the same torch draws with or without the NumPy sampler


def test_gamma_sampler_gradient_is_the_reparameterisation_gradient():
    # d E[x] / d a = 1 for x ~ Gamma(a, 1); the pathwise estimator must be unbiased
    torch.manual_seed(2)
    a = torch.full((200_000,), 0.7, requires_grad=True)
    torch.exp(log_gamma_rsample(a)).mean().backward()
    assert abs(a.grad.sum().item() - 1.0) < 0.02


def test_mask_dropout_keeps_the_expectation_and_rate():
    torch.manual_seed(3)
    drop = _MaskDropout(0.1)
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient is the same mask
    drop.eval()
    assert drop(x) is x


def _reference_mixture_ll(log_pi, k, sd, unspliced, spliced):
    # the formula the fused function replaced: stacked (2, ..., G, 4) means and a trailing logsumexp
    zero = torch.zeros_like(k["u_ind"])
    u_ss, s_ss = k["u_steady"].expand_as(zero), k["s_steady"].expand_as(zero)
    means = torch.stack([k["u_ind"], u_ss, k["u_rep"], zero, k["s_ind"], s_ss, k["s_rep"], zero], dim=-1)
    means = means.unflatten(-1, (2, 4)).movedim(-2, 0)
    shape = (2,) + (1,) * (means.dim() - 3) + sd.shape[1:]
    log_norm = (-torch.log(sd) - 0.5 * math.log(2 * math.pi)).view(shape)
    x = torch.stack([unspliced, spliced])
    x = x.view(2, *(1,) * (means.dim() - x.dim() - 1), *x.shape[1:], 1)
    zsc = (x - means) * (math.sqrt(0.5) / sd).view(shape)
    return torch.logsumexp(log_pi + log_norm - zsc * zsc, dim=-1)


@pytest.mark.parametrize("lead", [(), (3,)])
def test_mixture_log_likelihood_matches_the_reference_formula(lead):
    torch.manual_seed(4)
    b, g = 5, 3
    dd = {"dtype": torch.float64}
    log_pi = torch.log_softmax(torch.randn(*lead, b, g, 4, **dd), -1).requires_grad_()
    k = {key: torch.rand(*lead, b, g, **dd).requires_grad_() for key in ("u_ind", "u_rep", "s_ind", "s_rep")}
    k["u_steady"] = (torch.rand(g, **dd) + 0.5).requires_grad_()
    k["s_steady"] = (torch.rand(g, **dd) + 0.5).requires_grad_()
    sd = (torch.rand(2, g, 4, **dd) * 0.3 + 0.05).requires_grad_()
    u, s = torch.rand(b, g, **dd), torch.rand(b, g, **dd)
    inputs = [log_pi, *(k[n] for n in ("u_ind", "u_rep", "s_ind", "s_rep", "u_steady", "s_steady")), sd]

    got = mixture_log_likelihood(log_pi, k, sd, u, s)
    expected = _reference_mixture_ll(log_pi, k, sd, u, s)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    g_exp = torch.autograd.grad((expected * w).sum(), inputs)
    for a, e in zip(g_got, g_exp, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # and the observed values' gradient, which training never asks for
    u.requires_grad_()
    assert torch.autograd.gradcheck(lambda uu: mixture_log_likelihood(log_pi.detach(), k, sd, uu, s), (u,))


@pytest.mark.parametrize(("requires_grad", "numpy_sampler"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("conc", [(0.3, 2.0, 0.7, 0.1), (5.0, 0.05, 1.5, 3.0)])
def test_induction_repression_draws_have_the_dirichlet_law(conc, requires_grad, numpy_sampler, monkeypatch):
    # (pi_0, pi_2) from three Gammas (aggregation property) against the four-Gamma Dirichlet draws
    # (those of the reparameterised torch path): both marginals and their sum (which a wrong aggregate,
    # e.g. Gamma(a_1) alone, would shift); the gradient-free paths in several chunks, with leading dimensions
    monkeypatch.setattr(module, "_SAMPLE_CHUNK", 9_000)
    monkeypatch.setattr(module, "_NUMPY_SAMPLER", numpy_sampler)
    torch.manual_seed(5)
    n = 40_000
    a = torch.tensor(conc).expand(n, 4)
    if requires_grad:
        p0, p2 = induction_repression_rsample(a.clone().requires_grad_())
        p0, p2 = p0.detach(), p2.detach()
    else:
        p0, p2 = induction_repression_rsample(a.reshape(8, n // 8, 4))
        assert p0.shape == p2.shape == (8, n // 8)
        p0, p2 = p0.reshape(-1), p2.reshape(-1)
    full = dirichlet_log_rsample(a.movedim(-1, 0).contiguous().requires_grad_(), dim=0).detach().exp()
    for ours, ref in ((p0, full[0]), (p2, full[2]), (p0 + p2, full[0] + full[2])):
        assert stats.ks_2samp(ours.numpy(), ref.numpy()).pvalue > 1e-3
    a0 = sum(conc)
    for p, ai in ((p0, conc[0]), (p2, conc[2])):
        sd = math.sqrt(ai * (a0 - ai) / (a0 * a0 * (a0 + 1)) / n)
        assert abs(p.mean().item() - ai / a0) < 5 * sd
    cov = ((p0 - p0.mean()) * (p2 - p2.mean())).mean().item()
    assert cov == pytest.approx(-conc[0] * conc[2] / (a0 * a0 * (a0 + 1)), rel=0.1)


@pytest.mark.parametrize(
    ("linear_decoder", "batch_norm", "layer_norm", "n_layers"),
    [(False, True, False, 1), (True, True, False, 1), (False, True, True, 1), (False, False, True, 2)],
)
def test_decoder_in_eval_folds_batch_norm_without_changing_outputs(
    linear_decoder, batch_norm, layer_norm, n_layers, monkeypatch
):
    # batch norm and layer norm (VELOVI's default decoder has both) folded into the linear layers, the
    # rows decoded in blocks (37 rows here: the last block is partial), with and without latent_dim
    from cellvi.velovi._module import DecoderVELOVI

    monkeypatch.setattr(module, "_DECODE_ROWS", 37)
    torch.manual_seed(6)
    dec = DecoderVELOVI(
        6,
        9,
        n_hidden=32,
        n_layers=n_layers,
        linear_decoder=linear_decoder,
        use_batch_norm=batch_norm,
        use_layer_norm=layer_norm,
    )
    for m in dec.modules():  # biases far from zero: the layer norm's centring matters
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.add_(3.0)
    for m in dec.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    dec.eval()
    z = torch.randn(3, 40, 6)
    reference = dec(z)  # autograd enabled: scvi-tools' FCLayers forward, batch norm as its own op
    with torch.inference_mode():
        folded = dec(z)
    for a, b in zip(folded, reference, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    reference = dec(z, latent_dim=2)
    with torch.inference_mode():
        folded = dec(z, latent_dim=2)
    for a, b in zip(folded, reference, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [0, -1])
def test_dirichlet_log_rsample_gradient_is_autograd_through_the_gamma_draws(dim):
    # the hand-written backward of the training path against autograd through log_gamma_rsample and a
    # logsumexp, on the same draws (same seed), in float64; small concentrations included
    a = torch.cat(
        [torch.rand(4, 40, 6, dtype=torch.float64) * 3 + 0.01, torch.full((4, 2, 6), 0.02).double()], 1
    )
    a = a if dim == 0 else a.movedim(0, -1).contiguous()
    mine, ref = a.clone().requires_grad_(), a.clone().requires_grad_()
    torch.manual_seed(11)
    out = dirichlet_log_rsample(mine, dim=dim)
    torch.manual_seed(11)
    log_x = log_gamma_rsample(ref)
    expected = log_x - torch.logsumexp(log_x, dim=dim, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    ((out * w).sum() + out.exp().pow(2).sum()).backward()  # through log pi and through pi
    ((expected * w).sum() + expected.exp().pow(2).sum()).backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_mixture_log_likelihood_far_from_every_state():
    # observations many standard deviations from some states (exp arguments below float32's normal
    # range, which the forward floors): values and gradients as the reference formula's in float32
    torch.manual_seed(12)
    b, g = 64, 5
    log_pi = torch.log_softmax(torch.randn(b, g, 4), -1).requires_grad_()
    k = {key: (torch.rand(b, g) * 0.1).requires_grad_() for key in ("u_ind", "u_rep", "s_ind", "s_rep")}
    k["u_steady"] = torch.full((g,), 3.0).requires_grad_()
    k["s_steady"] = torch.full((g,), 4.0).requires_grad_()
    sd = torch.full((2, g, 4), 0.05).requires_grad_()
    u, s = torch.rand(b, g) * 4, torch.rand(b, g) * 4  # up to 80 sd from a mean: exp(-3200)
    inputs = [log_pi, *(k[n] for n in ("u_ind", "u_rep", "s_ind", "s_rep", "u_steady", "s_steady")), sd]
    got = mixture_log_likelihood(log_pi, k, sd, u, s)
    expected = _reference_mixture_ll(log_pi, k, sd, u, s)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    w = torch.rand_like(got)
    for a, e in zip(
        torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((expected * w).sum(), inputs)
    ):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


def test_induction_repression_rsample_carries_a_gradient():
    # the training-path draws of (pi_0, pi_2) are differentiable (the Dirichlet draw's backward reads its
    # output, which must not be modified in place); second derivatives raise instead of being wrong
    torch.manual_seed(13)
    a = (torch.rand(6, 5, 4) + 0.2).requires_grad_()
    p_ind, p_rep = induction_repression_rsample(a)
    (p_ind * 2 + p_rep).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    b = (torch.rand(4, 3, 2) + 0.2).requires_grad_()
    (g,) = torch.autograd.grad(dirichlet_log_rsample(b, dim=0).exp().pow(2).sum(), b, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
