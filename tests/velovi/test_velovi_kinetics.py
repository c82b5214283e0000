"""Closed-form kinetics against numerical integration; the simulator's ground truth is self-consistent."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import cellvi
from cellvi.velovi._kinetics import induction, repression


@pytest.mark.parametrize("gamma", [0.3, 0.8, 0.8 + 1e-7])  # the last is gamma == beta up to float error
@pytest.mark.parametrize("time_dep", [False, True])
def test_closed_forms_match_ode(gamma, time_dep):
    alpha, beta, a1, lam = 2.0, 0.8, 3.0, 0.5
    t_grid = np.linspace(0.0, 10.0, 21)

    def rate(t):
        return a1 - (a1 - alpha) * np.exp(-lam * t) if time_dep else alpha

    sol = solve_ivp(
        lambda t, y: [rate(t) - beta * y[0], beta * y[0] - gamma * y[1]],
        (0, 10),
        [0.0, 0.0],
        t_eval=t_grid,
        rtol=1e-10,
        atol=1e-12,
    )
    T = lambda x: torch.tensor(x, dtype=torch.float64)
    extra = (T(a1), T(lam)) if time_dep else (None, None)
    u, s = induction(T(alpha), T(beta), T(gamma), T(t_grid), *extra)
    np.testing.assert_allclose(u.numpy(), sol.y[0], atol=1e-5)
    np.testing.assert_allclose(s.numpy(), sol.y[1], atol=1e-4)
    # repression from the state at t=4
    u0, s0 = induction(T(alpha), T(beta), T(gamma), T(4.0), *extra)
    rep = solve_ivp(
        lambda t, y: [-beta * y[0], beta * y[0] - gamma * y[1]],
        (0, 6),
        [float(u0), float(s0)],
        t_eval=np.linspace(0, 6, 13),
        rtol=1e-10,
        atol=1e-12,
    )
    ur, sr = repression(u0, s0, T(beta), T(gamma), T(np.linspace(0, 6, 13)))
    np.testing.assert_allclose(ur.numpy(), rep.y[0], atol=1e-6)
    np.testing.assert_allclose(sr.numpy(), rep.y[1], atol=1e-6)


def test_simulator_is_seeded_and_consistent():
    a = cellvi.data.simulate_velocity(n_obs=120, n_vars=8, seed=3)
    b = cellvi.data.simulate_velocity(n_obs=120, n_vars=8, seed=3)
    c = cellvi.data.simulate_velocity(n_obs=120, n_vars=8, seed=4)
    np.testing.assert_array_equal(a.layers["spliced"], b.layers["spliced"])
    assert not np.array_equal(a.layers["spliced"], c.layers["spliced"])
    beta, gamma = a.var["true_beta"].to_numpy(), a.var["true_gamma"].to_numpy()
    u, s = a.layers["true_unspliced"], a.layers["true_spliced"]
    np.testing.assert_allclose(a.layers["true_velocity"], beta * u - gamma * s, rtol=1e-4, atol=1e-4)
    on = a.obs["true_time"].to_numpy()[:, None] <= a.var["true_t_switch"].to_numpy()
    assert ((a.layers["true_state"] <= 1) == on).all()
    assert (a.layers["true_velocity_u"][~on] < 0).all() and (a.layers["true_velocity_u"][on] >= 0).all()
    assert (
        a.layers["spliced"].dtype == np.float32
        and (a.layers["spliced"] == np.round(a.layers["spliced"])).all()
    )
    assert list(a.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2", "type_3"]
    sp = cellvi.data.simulate_velocity(n_obs=50, n_vars=4, seed=0, sparse=True)
    assert sp.layers["spliced"].format == "csr"
    with pytest.raises(ValueError, match="n_obs"):
        cellvi.data.simulate_velocity(n_obs=0)
    with pytest.raises(ValueError, match="beta_range"):
        cellvi.data.simulate_velocity(beta_range=(1.0, 0.5))


@pytest.mark.parametrize("near_equal", [False, True])
def test_exp_diff_inference_branch_gives_the_same_values(near_equal):
    # without autograd and with no near-equal per-gene rates, exp_diff skips the series branch: same values
    from cellvi.velovi._kinetics import exp_diff

    torch.manual_seed(0)
    a, b = torch.rand(40) * 3, torch.rand(40) * 3
    if near_equal:
        b[7] = a[7] + 1e-6
    t = torch.rand(5, 8, 40) * 20
    with torch.enable_grad():
        reference = exp_diff(a, b, t)
    with torch.inference_mode():
        got = exp_diff(a, b, t)
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=0)
        if near_equal:  # the limit t exp(-a t)
            limit = t[..., 7] * torch.exp(-a[7] * t[..., 7])
            torch.testing.assert_close(got[..., 7], limit, rtol=1e-4, atol=0)


def test_repression_inference_branch_gives_the_same_values():
    from cellvi.velovi._kinetics import repression

    torch.manual_seed(1)
    beta, gamma = torch.rand(30) * 3, torch.rand(30) * 3
    u0, s0 = torch.rand(30), torch.rand(30)
    tau = torch.rand(4, 6, 30) * 20
    with torch.enable_grad():
        reference = repression(u0, s0, beta, gamma, tau)
    with torch.inference_mode():
        got = repression(u0, s0, beta, gamma, tau)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("time_dep", [False, True])
@pytest.mark.parametrize("mode", ["spliced", "unspliced"])
def test_state_velocities_equal_the_kinetics_differences(time_dep, mode):
    # the closed-form induction velocity alpha beta exp_diff(gamma, beta, t) is beta u - gamma s
    from cellvi.velovi._module import VELOVAE, _velocities_of

    torch.manual_seed(2)
    module = VELOVAE(20, time_dep_transcription_rate=time_dep).double()
    with torch.no_grad():
        module.gamma_mean_unconstr.normal_()
        module.alpha_unconstr.normal_()
    rho, tau = torch.rand(3, 7, 20, dtype=torch.float64), torch.rand(3, 7, 20, dtype=torch.float64)
    with torch.inference_mode():
        expected = _velocities_of(module.kinetics(rho, tau), mode)
        got = module.state_velocities(rho, tau, mode)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _switch_reference(rho, tau, alpha, beta, gamma, t_s, t_max):
    """What :func:`switch_kinetics` computes, through :func:`induction` / :func:`repression` and autograd."""
    t, tau_rep = rho * t_s, (t_max - t_s) * tau
    u_ind, s_ind = induction(alpha, beta, gamma, t)
    u_sw, s_sw = induction(alpha, beta, gamma, t_s)
    u_rep, s_rep = repression(u_sw, s_sw, beta, gamma, tau_rep)
    return t, tau_rep, u_ind, s_ind, u_rep, s_rep, u_sw, s_sw


def _switch_inputs(case, n_genes=12, lead=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, low=0.0):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * scale + low

    alpha, beta, gamma = (
        rand(n_genes, scale=3, low=0.1),
        rand(n_genes, scale=3, low=0.1),
        rand(n_genes, scale=3, low=0.1),
    )
    if case == "near":  # |beta - gamma| below the Taylor threshold, both signs
        gamma = beta + (rand(n_genes) - 0.5) * 1e-4
    elif case == "equal":
        gamma = beta.clone()
    elif case == "mixed":  # some genes near-equal, some far apart (gamma >> beta: large ratios)
        gamma = torch.where(torch.arange(n_genes) % 3 == 0, beta + 3e-5, gamma * 10)
    t_s = rand(n_genes, scale=15, low=1)
    return rand(*lead, n_genes), rand(*lead, n_genes), alpha, beta, gamma, t_s


@pytest.mark.parametrize("case", ["random", "near", "equal", "mixed"])
@pytest.mark.parametrize("outputs", [range(8), [2, 3, 4, 5], [4], [7], [0, 1]])
def test_switch_kinetics_matches_autograd_of_the_closed_forms(case, outputs):
    from cellvi.velovi._kinetics import switch_kinetics

    inputs = _switch_inputs(case)
    mine = [x.clone().requires_grad_() for x in inputs]
    ref = [x.clone().requires_grad_() for x in inputs]
    out, expected = switch_kinetics(*mine, 20.0), _switch_reference(*ref, 20.0)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    weights = [
        torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
        for i, o in enumerate(out)
    ]
    sum((out[i] * weights[i]).sum() for i in outputs).backward()
    sum((expected[i] * weights[i]).sum() for i in outputs).backward()
    for name, a, b in zip(["rho", "tau", "alpha", "beta", "gamma", "t_s"], mine, ref):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
        else:
            torch.testing.assert_close(
                a.grad, b.grad, rtol=1e-9, atol=1e-9 * b.grad.abs().max().item(), msg=name
            )


def test_switch_kinetics_gradcheck_and_float32():
    from cellvi.velovi._kinetics import switch_kinetics

    inputs = [x.requires_grad_() for x in _switch_inputs("random", n_genes=5, lead=(4,))]
    assert torch.autograd.gradcheck(lambda *a: switch_kinetics(*a, 20.0), inputs)
    # float32 on (samples, cells, genes): values as the closed forms', to float32 rounding
    f32 = [x.detach().float() for x in _switch_inputs("mixed", lead=(2, 7, 3))]
    for a, b in zip(switch_kinetics(*f32, 20.0), _switch_reference(*f32, 20.0)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_kinetics_equal_the_inference_kinetics():
    """The module's kinetics go through switch_kinetics with autograd on and the closed forms without."""
    from cellvi.velovi._module import VELOVAE

    torch.manual_seed(0)
    module = VELOVAE(n_input=7)
    rho, tau = torch.rand(3, 7), torch.rand(3, 7)
    with torch.no_grad():
        expected = module.kinetics(rho, tau)
    got = module.kinetics(rho, tau)
    assert got["u_ind"].grad_fn is not None
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("grad", [False, True])
def test_kinetics_stay_finite_when_degradation_far_exceeds_splicing(grad):
    """gamma - beta = 5 at t = 20: exp(-beta t) expm1((gamma - beta) t) overflowed to inf and gave NaN."""
    from cellvi.velovi._kinetics import switch_kinetics

    alpha, beta = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 8.0])
    gamma = torch.tensor([6.0, 0.5])  # gamma >> beta, and beta >> gamma
    t = torch.tensor([[5.0], [18.0], [20.0]]).expand(3, 2)
    as64 = [x.double() for x in (alpha, beta, gamma, t)]
    with torch.set_grad_enabled(grad):
        u, s = induction(alpha, beta, gamma, t)
        u_r, s_r = repression(u[0], s[0], beta, gamma, t)
    u64, s64 = induction(*as64)
    torch.testing.assert_close(s, s64.float())
    torch.testing.assert_close(s_r, repression(u64[0], s64[0], *as64[1:3], as64[3]).__getitem__(1).float())
    assert torch.isfinite(torch.stack([u, s, u_r, s_r])).all()
    rho = (t / 20).clone().requires_grad_()
    out = switch_kinetics(rho, torch.rand(3, 2), alpha, beta, gamma, torch.tensor([20.0, 20.0]), 20.0)
    sum(o.sum() for o in out).backward()
    assert all(torch.isfinite(o).all() for o in out) and torch.isfinite(rho.grad).all()
