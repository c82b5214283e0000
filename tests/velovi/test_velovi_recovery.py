"""Ground truth recovery on cellvi.data.simulate_velocity: the model passes, a time-shuffled model fails."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outputs(trained, seeded):
    adata = trained.adata
    t = seeded(trained.get_latent_time, n_samples=10).to_numpy()
    v = seeded(trained.get_velocity, n_samples=10).to_numpy()
    pi, _ = seeded(trained.get_state_assignment, n_samples=10)
    return adata, t, v, pi


def _cell_time(t):
    return np.median(t * (20.0 / t.max(axis=0)), axis=1)


def test_latent_time_rank_correlates_with_truth(outputs):
    adata, t, _, _ = outputs
    truth = adata.obs["true_time"].to_numpy()
    rho = spearmanr(_cell_time(t), truth)[0]
    assert rho > 0.8
    shuffled = np.random.default_rng(0).permutation(truth)
    assert abs(spearmanr(_cell_time(t), shuffled)[0]) < 0.3


def test_velocity_matches_truth_per_gene_and_in_sign(outputs):
    adata, _, v, _ = outputs
    truth = adata.layers["true_velocity"]
    moving = np.abs(truth) > 0.1 * np.abs(truth).max(axis=0)
    assert (np.sign(v) == np.sign(truth))[moving].mean() > 0.8
    per_gene = [pearsonr(v[:, g], truth[:, g])[0] for g in range(adata.n_vars)]
    assert np.median(per_gene) > 0.7
    # a model whose cells are shuffled in time fails the same checks
    shuffled = v[np.random.default_rng(0).permutation(adata.n_obs)]
    assert (np.sign(shuffled) == np.sign(truth))[moving].mean() < 0.65
    assert np.median([pearsonr(shuffled[:, g], truth[:, g])[0] for g in range(adata.n_vars)]) < 0.2


def test_state_assignment_matches_induction_repression(outputs):
    adata, _, _, pi = outputs
    state = adata.layers["true_state"]
    truth_induction = state <= 1
    predicted_induction = pi[..., :2].sum(-1) > 0.5
    clear = (state == 0) | (state == 2)
    assert (predicted_induction == truth_induction)[clear].mean() > 0.75
    shuffled = predicted_induction[np.random.default_rng(0).permutation(adata.n_obs)]
    assert (shuffled == truth_induction)[clear].mean() < 0.65


def test_rate_ratio_in_unscaled_units(trained):
    adata = trained.adata
    r = trained.get_rates()
    ratio = r["gamma"] / r["beta"] * adata.var["velovi_unspliced_range"] / adata.var["velovi_spliced_range"]
    truth = adata.var["true_gamma"] / adata.var["true_beta"]
    assert pearsonr(ratio, truth)[0] > 0.8


def test_warmup_is_over_when_training_stops(trained):
    history = trained.history
    assert float(history["kl_weight"].iloc[-1, 0]) == pytest.approx(1.0)
