"""`make experiment NAME=nash_gap`: does the idealised GPO dynamics reach the Nash equilibrium at T^-1/2?

For random games r ~ U[0, 1]^{m x n} (several sizes, `games` seeds each) and every T on a log grid,
run the dynamics for T rounds with beta = eta = c*sqrt(T) (each T is its own run, since the step size
depends on T) and measure, per game:
- the exact Nash gap of the averaged policies (the theorem's object) and of the last iterates;
- the attacker's entropy H(mu_T), H(mu_hat) with and without the entropy term (mode collapse);
- TV(mu, mu*) to the Gibbs equilibrium mu* ∝ exp(-V/tau) of the regularised game;
- a coupled variant outside the theorem: a shared-parameter log-linear defender (dynamics.run_coupled).
Writes metrics.json (every number), results.md (slopes, NEGap*sqrt(T), collapse, Gibbs distance) and
nash_gap.png into run_dir.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from alignjax.theory import dynamics
from alignjax.theory.game import Game, entropy, gibbs, nash_gap, prompt_loss, random_game, tv, value

SPEC_GAPS = {10: 0.58, 100: 0.32, 1000: 0.13, 10000: 0.05}  # spec section 3, 20 prompts x 10 responses


@dataclasses.dataclass
class CoupledConfig:
    enabled: bool = True
    m: int = 20  # prompts
    n: int = 10  # responses
    # d, the shared parameter's dimension (d << m*(n-1): the class cannot be greedy everywhere)
    features: int = 4
    restricted_starts: int = 16  # multi-start ascent for the class's best response (a lower bound)
    restricted_steps: int = 200


@dataclasses.dataclass
class Config:
    sizes: list[tuple[int, int]] = dataclasses.field(default_factory=lambda: [(5, 3), (20, 10), (50, 20)])
    games: int = 8  # random games (one seed each) per size
    seed: int = 0
    t_min: int = 10
    t_max: int = 100_000
    points_per_decade: int = 3
    fit_t_min: int = 1000  # slopes are fitted on T >= fit_t_min (the asymptotic regime) and on the whole grid
    c: float = 1.0  # beta = eta = c * sqrt(T)
    tau: float = 0.1  # entropy weight of the regularised variants
    div_scale: float = 0.0  # R_div ~ U[0, div_scale]; 0 matches the spec's numpy check
    sft_sharpness: float = 2.0  # "SFT-like" init: pi0 = softmax(sharpness * N(0,1)), mu0 likewise
    x64: bool = True  # float64 (see dynamics.py on precision)
    spec_games: int = 64  # games for the comparison with the spec's numpy figures (20x10, simultaneous)
    coupled: CoupledConfig = dataclasses.field(default_factory=CoupledConfig)


# name -> (tau multiplier, alternating, sft init)
VARIANTS = {
    "sim": (0.0, False, False),
    "alt": (0.0, True, False),
    "sim+ent": (1.0, False, False),
    "alt+ent": (1.0, True, False),
    "sim,sft-init": (0.0, False, True),
}


def t_grid(cfg: Config) -> np.ndarray:
    lo, hi = np.log10(cfg.t_min), np.log10(cfg.t_max)
    k = int(round((hi - lo) * cfg.points_per_decade)) + 1
    return np.unique(np.round(np.logspace(lo, hi, k)).astype(int))


def fit_slope(ts, gaps) -> np.ndarray:
    """Least-squares slope of log gap on log T along the last axis. ts [K], gaps [..., K] -> [...]."""
    x = np.log(np.asarray(ts, float))
    y = np.log(np.asarray(gaps, float))
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc**2).sum()


def _sft_init(key, m, n, sharpness, dtype):
    kp, km = jax.random.split(key)
    pi0 = jax.nn.softmax(sharpness * jax.random.normal(kp, (m, n), dtype), -1)
    mu0 = jax.nn.softmax(sharpness * jax.random.normal(km, (m,), dtype))
    return pi0, mu0


def _metrics(game: Game, res: dynamics.DynamicsResult, tau) -> dict:
    """Per-game diagnostics of one run (all scalars)."""
    v = value(game)
    star = jnp.argmin(v)
    safe_tau = jnp.where(tau > 0, tau, 1.0)
    mu_star = gibbs(game, safe_tau)
    return {
        "gap_avg": nash_gap(game, res.pi_avg, res.mu_avg, tau),
        "gap_last": nash_gap(game, res.pi_last, res.mu_last, tau),
        "H_last": entropy(res.mu_last),
        "H_avg": entropy(res.mu_avg),
        "mass_argminV_last": res.mu_last[star],
        "mass_argminV_avg": res.mu_avg[star],
        "tv_gibbs_last": tv(res.mu_last, mu_star),
        "tv_gibbs_avg": tv(res.mu_avg, mu_star),
        "mu_path": res.mu_path,
    }


def make_tabular_sweep(c: float):
    """jit(vmap over variants x games) of one T; T is traced so a single compile serves the grid."""

    def one(game, T, tau, alt, pi0, mu0):
        res = dynamics.run(game, T, c, tau, alt, pi0, mu0)
        return _metrics(game, res, tau)

    per_game = jax.vmap(one, in_axes=(0, None, None, None, 0, 0))
    per_variant = jax.vmap(per_game, in_axes=(None, None, 0, 0, 0, 0))
    return jax.jit(per_variant)


def make_coupled_sweep(c: float, cc: CoupledConfig):
    def one(game, feats, T, key):
        res = dynamics.run_coupled(game, feats, T, c)
        out = _metrics(game, res, 0.0)
        log_pi0 = jnp.zeros_like(game.r) - jnp.log(game.r.shape[1])
        # Restricted gaps: the defender may only deviate within its log-linear class (lower bounds).
        # One vmapped ascent serves (mu_hat, mu_T): one compiled loop instead of two.
        best_avg, best_last = jax.vmap(
            lambda mu, k: dynamics.best_loglinear_value(
                game, feats, log_pi0, mu, k, cc.restricted_starts, cc.restricted_steps
            )
        )(jnp.stack([res.mu_avg, res.mu_last]), jax.random.split(key))
        out["restricted_gap_avg"] = best_avg - jnp.min(prompt_loss(game, res.pi_avg))
        out["restricted_gap_last"] = best_last - jnp.min(prompt_loss(game, res.pi_last))
        return out

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0)))


def run(cfg: Config, run_dir) -> None:
    run_dir = pathlib.Path(run_dir)
    with jax.enable_x64(cfg.x64):
        out = _run(cfg)
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=1))
    (run_dir / "results.md").write_text(_table(cfg, out))
    _plot(cfg, out, run_dir / "nash_gap.png")
    print((run_dir / "results.md").read_text())
    print(f"[nash_gap] wrote {run_dir}/results.md, nash_gap.png, metrics.json")


def _run(cfg: Config) -> dict:
    dtype = jnp.float64 if cfg.x64 else jnp.float32
    ts = t_grid(cfg)
    key = jax.random.PRNGKey(cfg.seed)
    names = list(VARIANTS)
    taus = jnp.asarray([VARIANTS[k][0] * cfg.tau for k in names], dtype)
    alts = jnp.asarray([VARIANTS[k][1] for k in names])
    sweep = make_tabular_sweep(cfg.c)
    out = {
        "T": ts.tolist(),
        "variants": names,
        "tabular": {},
        "coupled": None,
        "spec_check": None,
        "seconds": {},
    }
    total = len(cfg.sizes) * len(ts) + (len(ts) if cfg.coupled.enabled else 0)
    bar = tqdm(total=total, desc="nash_gap", unit="T")
    for m, n in cfg.sizes:
        t0 = time.time()
        key, kg, ks = jax.random.split(key, 3)
        games = jax.vmap(lambda k, m=m, n=n: random_game(k, m, n, cfg.div_scale, dtype))(
            jax.random.split(kg, cfg.games)
        )
        sft = jax.vmap(lambda k, m=m, n=n: _sft_init(k, m, n, cfg.sft_sharpness, dtype))(
            jax.random.split(ks, cfg.games)
        )
        uni = (jnp.full((cfg.games, m, n), 1.0 / n, dtype), jnp.full((cfg.games, m), 1.0 / m, dtype))
        pi0 = jnp.stack([sft[0] if VARIANTS[k][2] else uni[0] for k in names])
        mu0 = jnp.stack([sft[1] if VARIANTS[k][2] else uni[1] for k in names])
        rows = []
        for T in ts:
            rows.append(jax.device_get(sweep(games, int(T), taus, alts, pi0, mu0)))
            bar.update(1)
        # metric -> [variants, games, K]
        stacked = {k: np.stack([r[k] for r in rows], -1) for k in rows[0]}
        h_gibbs = jax.vmap(lambda g: entropy(gibbs(g, cfg.tau)))(games)
        out["tabular"][f"{m}x{n}"] = {
            **{k: {name: v[i].tolist() for i, name in enumerate(names)} for k, v in stacked.items()},
            "H_gibbs": np.asarray(h_gibbs).tolist(),
        }
        out["seconds"][f"{m}x{n}"] = time.time() - t0
    if cfg.spec_games > 0:
        key, kg = jax.random.split(key)
        games = jax.vmap(lambda k: random_game(k, 20, 10, 0.0, dtype))(jax.random.split(kg, cfg.spec_games))
        spec = jax.jit(jax.vmap(lambda g, T: nash_gap(g, *dynamics.run(g, T, 1.0)[:2]), in_axes=(0, None)))
        out["spec_check"] = {t: np.asarray(spec(games, t)).tolist() for t in SPEC_GAPS}
    if cfg.coupled.enabled:
        t0 = time.time()
        cc = cfg.coupled
        key, kg, kf, kr = jax.random.split(key, 4)
        games = jax.vmap(lambda k: random_game(k, cc.m, cc.n, cfg.div_scale, dtype))(
            jax.random.split(kg, cfg.games)
        )
        feats = jax.random.normal(kf, (cfg.games, cc.m, cc.n, cc.features), dtype)
        csweep = make_coupled_sweep(cfg.c, cc)
        rows = []
        for T in ts:
            rows.append(jax.device_get(csweep(games, feats, int(T), jax.random.split(kr, cfg.games))))
            bar.update(1)
        out["coupled"] = {k: np.stack([r[k] for r in rows], -1).tolist() for k in rows[0]}
        out["seconds"]["coupled"] = time.time() - t0
    bar.close()
    return out


def _fmt_range(a) -> str:
    a = np.asarray(a)
    return f"{np.median(a):.3f} [{a.min():.3f}, {a.max():.3f}]"


def _table(cfg: Config, out: dict) -> str:
    ts = np.asarray(out["T"])
    tail = ts >= cfg.fit_t_min
    show = [t for t in ts if np.isclose(np.log10(t) % 1, 0) or t == ts[-1]]
    idx = [int(np.where(ts == t)[0][0]) for t in show]
    lines = [
        "# Nash gap of the idealised GPO dynamics (spec section 3)",
        "",
        f"beta = eta = {cfg.c} * sqrt(T); {cfg.games} random games per size, r ~ U[0,1], "
        f"R_div ~ U[0,{cfg.div_scale}]; entropy weight tau = {cfg.tau} in the '+ent' variants "
        "(their gap is the regularised one). Slopes: least squares of log NEGap on log T per game, "
        f"median [min, max] over games; 'tail' fits T >= {cfg.fit_t_min}, 'all' the whole grid "
        f"{ts[0]}..{ts[-1]}. NEGap*sqrt(T): median over games.",
        "",
        "| size | variant | slope tail | slope all | "
        + " | ".join(f"√T·gap T={t:g}" for t in show)
        + f" | last-iterate gap T={ts[-1]:g} |",
        "|---|---|---|---|" + "---|" * len(show) + "---|",
    ]
    for size, res in out["tabular"].items():
        for name in out["variants"]:
            g = np.asarray(res["gap_avg"][name])  # [games, K]
            gl = np.asarray(res["gap_last"][name])
            scaled = np.median(g * np.sqrt(ts), 0)
            lines.append(
                f"| {size} | {name} | {_fmt_range(fit_slope(ts[tail], g[:, tail]))} | "
                f"{_fmt_range(fit_slope(ts, g))} | "
                + " | ".join(f"{scaled[i]:.2f}" for i in idx)
                + f" | {np.median(gl[:, -1]):.2e} |"
            )
    lines += ["", "## Spec check (20 prompts x 10 responses, simultaneous, uniform init)", ""]
    if out.get("spec_check"):
        lines += [
            f"{cfg.spec_games} random games, r ~ U[0,1], R_div = 0, beta = eta = sqrt(T).",
            "",
            "| T | spec (one numpy run) | ours: mean ± sd | ours: [5%, 95%] over games |",
            "|---|---|---|---|",
        ]
        for t, s in SPEC_GAPS.items():
            g = np.asarray(out["spec_check"][t])
            lines.append(
                f"| {t} | {s} | {g.mean():.3f} ± {g.std():.3f} | "
                f"[{np.quantile(g, 0.05):.3f}, {np.quantile(g, 0.95):.3f}] |"
            )
    else:
        lines.append("(disabled: spec_games = 0)")
    k = -1
    lines += [
        "",
        f"## Mode collapse and the Gibbs equilibrium at T = {ts[k]:g} (medians over games)",
        "",
        "| size | variant | H(mu_T) | H(mu_hat) | log m | H(Gibbs) | mass of argmin V in mu_T | "
        "TV(mu_hat, Gibbs) | TV(mu_T, Gibbs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, res in out["tabular"].items():
        m = int(size.split("x")[0])
        for name in ("sim", "alt", "sim+ent", "alt+ent"):
            med = lambda key, res=res, name=name: np.median(np.asarray(res[key][name])[:, k])  # noqa: E731
            ent = VARIANTS[name][0] > 0
            lines.append(
                f"| {size} | {name} | {med('H_last'):.3f} | {med('H_avg'):.3f} | {np.log(m):.3f} | "
                f"{np.median(res['H_gibbs']):.3f} | {med('mass_argminV_last'):.3f} | "
                + (f"{med('tv_gibbs_avg'):.4f} | {med('tv_gibbs_last'):.2e} |" if ent else "- | - |")
            )
    if out["coupled"] is not None:
        c = {k: np.asarray(v) for k, v in out["coupled"].items()}
        cc = cfg.coupled
        lines += [
            "",
            f"## Coupled variant: log-linear defender, d = {cc.features} shared features, "
            f"{cc.m}x{cc.n} games (outside the theorem)",
            "",
            "Full-class gaps use the exact NEGap; restricted gaps let the defender deviate only within "
            "its class (best response by multi-start ascent: a lower bound). mu path = sum_t "
            "TV(mu_t+1, mu_t) (about 1 when mu converges monotonically).",
            "",
            "| T | gap avg (full class) | gap last (full class) | restricted gap avg | "
            "restricted gap last | H(mu_T) | mu path |",
            "|---|---|---|---|---|---|---|",
        ]
        for i in idx:
            md = lambda key, i=i: np.median(c[key][:, i])  # noqa: E731
            lines.append(
                f"| {ts[i]:g} | {md('gap_avg'):.4f} | {md('gap_last'):.4f} | "
                f"{md('restricted_gap_avg'):.4f} | {md('restricted_gap_last'):.4f} | "
                f"{md('H_last'):.3f} | {md('mu_path'):.2f} |"
            )
        lines.append(
            f"\nslope (all T) of the full-class averaged gap: {_fmt_range(fit_slope(ts, c['gap_avg']))}; "
            f"of the restricted averaged gap: "
            f"{_fmt_range(fit_slope(ts, np.maximum(c['restricted_gap_avg'], 1e-12)))}"
        )
    lines.append("\nWall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in out["seconds"].items()))
    return "\n".join(lines) + "\n"


def _band(ax, ts, a, label, **kw):
    a = np.asarray(a)
    (line,) = ax.plot(ts, np.median(a, 0), label=label, **kw)
    ax.fill_between(ts, a.min(0), a.max(0), alpha=0.2, color=line.get_color())


def _plot(cfg: Config, out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.asarray(out["T"])
    tail = ts >= cfg.fit_t_min
    main = "20x10" if "20x10" in out["tabular"] else next(iter(out["tabular"]))
    res = out["tabular"][main]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    ax = axes[0, 0]
    for size, r in out["tabular"].items():
        g = np.asarray(r["gap_avg"]["sim"])
        s = fit_slope(ts[tail], g[:, tail])
        _band(ax, ts, g, f"{size}: slope {np.median(s):.2f} [{s.min():.2f}, {s.max():.2f}]", marker=".")
    ax.plot(ts, 2 / np.sqrt(ts), "k--", lw=1, label="2 T^-1/2")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="T",
        ylabel="NEGap(pi_hat, mu_hat)",
        title=f"averaged gap, simultaneous (band: min-max over games; fit T>={cfg.fit_t_min})",
    )
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for name in out["variants"]:
        # alt-variants overlap their sim twins (the difference is a telescoping O(1/sqrt T) term): dash them
        _band(
            ax,
            ts,
            res["gap_avg"][name],
            f"{name} (avg)",
            marker=".",
            ls="--" if name.startswith("alt") else "-",
        )
    for name in ("sim", "sim+ent"):
        _band(ax, ts, np.maximum(np.asarray(res["gap_last"][name]), 1e-16), f"{name} (last iterate)", ls=":")
    ax.plot(ts, 2 / np.sqrt(ts), "k--", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="T",
        ylabel="Nash gap",
        title=f"{main}: variants, averaged and last",
    )
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    g = np.asarray(res["gap_avg"]["sim"]) * np.sqrt(ts)
    _band(ax, ts, g, "sim", marker=".")
    _band(ax, ts, np.asarray(res["gap_avg"]["alt"]) * np.sqrt(ts), "alt", marker="x", ls="--")
    _band(ax, ts, np.asarray(res["gap_avg"]["sim+ent"]) * np.sqrt(ts), "sim+ent", marker=".")
    mm, nn = (int(v) for v in main.split("x"))
    ax.axhline(cfg.c * np.log(mm * nn), color="k", lw=1, ls=":", label="c ln(mn): Hedge regret constant")
    ax.set(
        xscale="log", xlabel="T", ylabel="NEGap * sqrt(T)", title=f"{main}: NEGap*sqrt(T) (bounded = T^-1/2)"
    )
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    m = int(main.split("x")[0])
    for name, ls in (("sim", "-"), ("sim+ent", "-")):
        _band(ax, ts, res["H_last"][name], f"H(mu_T) {name}", ls=ls, marker=".")
        _band(ax, ts, res["H_avg"][name], f"H(mu_hat) {name}", ls="--")
    ax.axhline(np.log(m), color="k", lw=1, ls=":", label="log m (uniform)")
    ax.axhline(np.median(res["H_gibbs"]), color="r", lw=1, ls=":", label=f"H(Gibbs), tau={cfg.tau}")
    ax.set(
        xscale="log", xlabel="T", ylabel="nats", title=f"{main}: attacker entropy (collapse without the term)"
    )
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for name in ("sim+ent", "alt+ent"):
        _band(ax, ts, res["tv_gibbs_avg"][name], f"TV(mu_hat, Gibbs) {name}", marker=".")
        _band(
            ax,
            ts,
            np.maximum(np.asarray(res["tv_gibbs_last"][name]), 1e-16),
            f"TV(mu_T, Gibbs) {name}",
            ls=":",
            marker="x",
        )
    ax.axhline(0.05, color="k", lw=1, ls=":")
    ax.set(
        xscale="log", yscale="log", xlabel="T", ylabel="TV", title=f"{main}: distance to mu* ∝ exp(-V/tau)"
    )
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    if out["coupled"] is not None:
        c = {k: np.asarray(v) for k, v in out["coupled"].items()}
        _band(ax, ts, c["gap_avg"], "full-class gap, avg", marker=".")
        _band(ax, ts, c["gap_last"], "full-class gap, last", ls=":")
        _band(ax, ts, np.maximum(c["restricted_gap_avg"], 1e-6), "restricted gap, avg", marker=".")
        _band(ax, ts, np.maximum(c["restricted_gap_last"], 1e-6), "restricted gap, last", ls=":")
        ax.plot(ts, 2 / np.sqrt(ts), "k--", lw=1)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="T",
            ylabel="gap",
            title=f"coupled: log-linear defender, d={cfg.coupled.features}",
        )
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
