"""alignjax.theory against independent references: NumPy brute force over pure strategies, SciPy
minimisation over the simplex, a plain NumPy loop of the spec's algorithm, closed forms (the Gibbs
equilibrium, the tabular defender pi_T ∝ exp((T-1) r / beta), the Hedge regret constant)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from alignjax.theory import dynamics
from alignjax.theory.game import Game, nash_gap, random_game


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def np_payoff(r, r_div, pi, mu):
    return float(mu @ ((pi * r).sum(1) - r_div))


def np_entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def brute_gap(r, r_div, pi, mu, tau=0.0):
    """max over the n^m pure defenders minus min over the attacker (pure for tau = 0, else SLSQP)."""
    m, n = r.shape
    best_def = -np.inf
    for ys in itertools.product(range(n), repeat=m):
        det = np.zeros((m, n))
        det[np.arange(m), ys] = 1.0
        best_def = max(best_def, np_payoff(r, r_div, det, mu) - tau * np_entropy(mu))
    if tau == 0:
        best_att = min(np_payoff(r, r_div, pi, np.eye(m)[x]) for x in range(m))
    else:
        f = lambda q: np_payoff(r, r_div, pi, q) - tau * np_entropy(np.clip(q, 1e-300, None))  # noqa: E731
        sol = minimize(
            f,
            np.full(m, 1.0 / m),
            method="SLSQP",
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1}],
            options={"ftol": 1e-14},
        )
        best_att = sol.fun
    return best_def - best_att


@pytest.mark.parametrize("m,n,tau", [(3, 3, 0.0), (4, 2, 0.0), (3, 3, 0.2), (4, 3, 0.05)])
def test_nash_gap_matches_brute_force(m, n, tau):
    rng = np.random.default_rng(m * 10 + n)
    for _ in range(3):
        r = rng.uniform(size=(m, n))
        r_div = rng.uniform(0, 0.3, size=m)
        pi = rng.dirichlet(np.ones(n), size=m)
        mu = rng.dirichlet(np.ones(m))
        ours = float(
            nash_gap(Game(jnp.asarray(r), jnp.asarray(r_div)), jnp.asarray(pi), jnp.asarray(mu), tau)
        )
        ref = brute_gap(r, r_div, pi, mu, tau)
        assert ours >= 0
        assert ours == pytest.approx(ref, abs=1e-6)


def test_gap_vanishes_at_closed_form_equilibria():
    rng = np.random.default_rng(0)
    r, r_div, tau = rng.uniform(size=(5, 4)), rng.uniform(0, 0.2, 5), 0.1
    greedy = np.eye(4)[r.argmax(1)]
    v = r.max(1) - r_div
    gibbs = np.exp(-(v - v.min()) / tau)
    gibbs /= gibbs.sum()
    game = Game(jnp.asarray(r), jnp.asarray(r_div))
    assert float(nash_gap(game, jnp.asarray(greedy), jnp.asarray(gibbs), tau)) == pytest.approx(0, abs=1e-12)
    assert float(nash_gap(game, jnp.asarray(greedy), jnp.asarray(np.eye(5)[v.argmin()]))) == pytest.approx(
        0, abs=1e-12
    )
    # ... and not at a perturbed attacker.
    assert float(nash_gap(game, jnp.asarray(greedy), jnp.full(5, 0.2), tau)) > 1e-3


def np_dynamics(r, r_div, T, c, tau, alternating, pi0, mu0):
    """The spec's algorithm as a plain loop (no shared code with the library)."""
    beta = eta = c * np.sqrt(T)
    pi, mu = pi0.copy(), mu0.copy()
    pis, mus = [], []
    for _ in range(T):
        pis.append(pi)
        mus.append(mu)
        new_pi = pi * np.exp(r / beta)
        new_pi /= new_pi.sum(1, keepdims=True)
        loss = ((new_pi if alternating else pi) * r).sum(1) - r_div
        # argmin_q <q, l> - tau H(q) + eta KL(q || mu)
        logits = (eta * np.log(mu) - loss) / (eta + tau)
        new_mu = np.exp(logits - logits.max())
        pi, mu = new_pi, new_mu / new_mu.sum()
    return np.mean(pis, 0), np.mean(mus, 0), pis[-1], mus[-1]


@pytest.mark.parametrize(
    "tau,alternating,sft", [(0.0, False, False), (0.0, True, False), (0.3, False, True), (0.3, True, False)]
)
def test_dynamics_matches_numpy_loop(tau, alternating, sft):
    rng = np.random.default_rng(1)
    m, n, T = 6, 4, 300
    r, r_div = rng.uniform(size=(m, n)), rng.uniform(0, 0.2, m)
    pi0 = rng.dirichlet(np.ones(n), size=m) if sft else np.full((m, n), 1 / n)
    mu0 = rng.dirichlet(np.ones(m)) if sft else np.full(m, 1 / m)
    ref = np_dynamics(r, r_div, T, 0.5, tau, alternating, pi0, mu0)
    res = dynamics.run(
        Game(jnp.asarray(r), jnp.asarray(r_div)), T, 0.5, tau, alternating, jnp.asarray(pi0), jnp.asarray(mu0)
    )
    for ours, theirs in zip((res.pi_avg, res.mu_avg, res.pi_last, res.mu_last), ref, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-9, atol=1e-12)
    # The defender's last iterate in closed form: pi_T ∝ pi_1 exp((T-1) r / beta).
    cf = pi0 * np.exp((T - 1) * r / (0.5 * np.sqrt(T)))
    np.testing.assert_allclose(np.asarray(res.pi_last), cf / cf.sum(1, keepdims=True), rtol=1e-9)


def test_one_round_returns_the_initial_policies_and_zero_rounds_is_an_error():
    game = random_game(jax.random.PRNGKey(0), 3, 2, 0.1, jnp.float64)
    pi0 = jnp.asarray([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    res = dynamics.run(game, 1, pi0=pi0)
    np.testing.assert_array_equal(np.asarray(res.pi_avg), np.asarray(pi0))
    np.testing.assert_allclose(np.asarray(res.mu_last), np.full(3, 1 / 3), rtol=1e-15)
    with pytest.raises(ValueError, match="T >= 1"):
        dynamics.run(game, 0)


# One sweep shared by the rate / collapse / Gibbs tests: 4 random 20x10 games, three variants.
TS = np.array([1000, 3162, 10000, 31623])
M, N, TAU = 20, 10, 0.1


@pytest.fixture(scope="module")
def sweep():
    with jax.enable_x64(True):
        games = jax.vmap(lambda k: random_game(k, M, N, 0.0, jnp.float64))(
            jax.random.split(jax.random.PRNGKey(3), 4)
        )

        @jax.jit
        def go(T):
            def one(game, tau, alt):
                return dynamics.run(game, T, 1.0, tau, alt)

            per_game = jax.vmap(one, in_axes=(0, None, None))
            return jax.vmap(per_game, in_axes=(None, 0, 0))(
                games, jnp.array([0.0, 0.0, TAU]), jnp.array([False, True, False])
            )

        runs = [jax.device_get(go(int(T))) for T in TS]  # each: DynamicsResult with leading [3, 4]
        gaps = np.stack(
            [
                [
                    jax.vmap(nash_gap, in_axes=(0, 0, 0, None))(games, rr.pi_avg[v], rr.mu_avg[v], tau)
                    for v, tau in enumerate((0.0, 0.0, TAU))
                ]
                for rr in runs
            ],
            -1,
        )  # [3, 4, K]
        return jax.device_get(games), runs, np.asarray(gaps)


def test_averaged_gap_rate(sweep):
    _, _, gaps = sweep
    x = np.log(TS) - np.log(TS).mean()
    slopes = ((np.log(gaps) - np.log(gaps).mean(-1, keepdims=True)) * x).sum(-1) / (x**2).sum()
    assert np.all((slopes >= -0.65) & (slopes <= -0.40)), slopes
    scaled = gaps * np.sqrt(TS)
    # Bounded: flat over the last decade (< 5% change) and within 25% of the Hedge constant
    # c*(ln m + ln n) (c = 1), the sum of the two players' no-regret bounds for unweighted losses. It
    # may exceed that constant slightly: the defender's regret is weighted by mu_t, spread early on.
    assert np.all(np.abs(scaled[..., -1] / scaled[..., -2] - 1) < 0.05), scaled
    assert scaled.max() <= 1.25 * (np.log(M) + np.log(N)), scaled.max()


def test_attacker_collapses_without_entropy(sweep):
    games, runs, _ = sweep
    v = games.r.max(-1) - games.r_div  # [4, m]
    star = v.argmin(-1)
    ent = lambda p: -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)  # noqa: E731
    h_last = np.stack([ent(rr.mu_last[0]) for rr in runs], -1)  # [4, K]
    assert np.all(np.diff(h_last, axis=-1) < 0)  # falls with T, from log m = 3.0 ...
    assert np.median(h_last[:, -1]) < 0.05  # ... towards 0
    # Mass goes to argmin V: mu_T ≈ softmax(-sqrt(T) V / c) once the defender is greedy, so the
    # attacker's excess value is at most c ln m / sqrt(T) (a Gibbs bound; 2x for the transient), and
    # collapse onto argmin V is complete unless the runner-up prompt is within ~10 c / sqrt(T) of it.
    T = TS[-1]
    mu_T = runs[-1].mu_last[0]
    excess = (mu_T * (v - v.min(-1, keepdims=True))).sum(-1)
    assert np.all(excess <= 2 * np.log(M) / np.sqrt(T)), excess
    v_sorted = np.sort(v, -1)
    separated = v_sorted[:, 1] - v_sorted[:, 0] > 10 / np.sqrt(T)
    assert separated.sum() >= 2  # the check below is not vacuous
    mass = mu_T[np.arange(4), star]
    assert np.all(mass[separated] > 0.99), mass


def test_entropy_term_reaches_gibbs(sweep):
    games, runs, _ = sweep
    v = games.r.max(-1) - games.r_div
    gibbs = np.exp(-(v - v.min(-1, keepdims=True)) / TAU)
    gibbs /= gibbs.sum(-1, keepdims=True)
    tv = 0.5 * np.abs(runs[-1].mu_avg[2] - gibbs).sum(-1)
    assert np.all(tv < 0.05), tv
    tv_first = 0.5 * np.abs(runs[0].mu_avg[2] - gibbs).sum(-1)
    assert np.all(tv < tv_first)


def test_coupled_with_one_hot_features_is_tabular():
    rng = np.random.default_rng(2)
    m, n, T = 4, 3, 200
    r = rng.uniform(size=(m, n))
    feats = np.eye(m * n).reshape(m, n, m * n)
    game = Game(jnp.asarray(r), jnp.zeros(m))
    res = dynamics.run_coupled(game, jnp.asarray(feats), T, 1.0, ridge=1e-12)
    ref = np_dynamics(r, np.zeros(m), T, 1.0, 0.0, False, np.full((m, n), 1 / n), np.full(m, 1 / m))
    np.testing.assert_allclose(np.asarray(res.pi_last), ref[2], atol=1e-7)
    np.testing.assert_allclose(np.asarray(res.mu_avg), ref[1], atol=1e-7)


def test_best_loglinear_value():
    rng = np.random.default_rng(4)
    m, n, d = 5, 4, 3
    r, mu = rng.uniform(size=(m, n)), rng.dirichlet(np.ones(m))
    game, log_pi0 = Game(jnp.asarray(r), jnp.zeros(m)), jnp.full((m, n), -np.log(n))
    # One-hot features: the class is every policy, so the sup is <mu, max_y r> (approached as |theta| grows).
    onehot = jnp.asarray(np.eye(m * n).reshape(m, n, m * n))
    best = float(dynamics.best_loglinear_value(game, onehot, log_pi0, jnp.asarray(mu), jax.random.PRNGKey(0)))
    assert best == pytest.approx(float(mu @ r.max(1)), abs=1e-2)
    # Shared features: at least as good as a NumPy random search over theta.
    feats = rng.normal(size=(m, n, d))
    best = float(
        dynamics.best_loglinear_value(
            game, jnp.asarray(feats), log_pi0, jnp.asarray(mu), jax.random.PRNGKey(1)
        )
    )
    thetas = rng.normal(scale=5.0, size=(4000, d))
    logits = np.einsum("xyd,kd->kxy", feats, thetas)
    pol = np.exp(logits - logits.max(-1, keepdims=True))
    pol /= pol.sum(-1, keepdims=True)
    assert best >= (np.einsum("kxy,xy->kx", pol, r) @ mu).max() - 1e-6


def test_nash_gap_experiment_runs(tmp_path):
    from alignjax.cli import load_experiment

    module, cfg = load_experiment(
        "nash_gap",
        [
            "sizes=[[4,3]]",
            "games=2",
            "t_max=100",
            "points_per_decade=2",
            "fit_t_min=10",
            "coupled.m=4",
            "coupled.n=3",
            "coupled.restricted_steps=10",
            "coupled.restricted_starts=2",
            "spec_games=0",
        ],
    )
    module.run(cfg, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| 4x3 | sim |" in text and "Coupled variant" in text
    assert (tmp_path / "nash_gap.png").stat().st_size > 10_000
