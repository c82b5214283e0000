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
