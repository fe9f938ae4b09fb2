"""Run-level reporting, shared by every setting: results.json / results.md, PNG plots, HF export.

    write_results(run_dir, results, markdown)   results.json (the dict) and results.md (the setting's
                                                 tables), side by side in the run folder
    make_plots(run_dir, cfg)                     plots/*.png from metrics.jsonl (stages shaded)
    export_players(run_dir, state, spec, tok)    export/{defender,attacker}: HF causal-LM folders
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np

from alignjax.game import schedule as sched
from alignjax.game.loop import read_metrics
from alignjax.models.hf_io import save_pretrained


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def history_summary(cfg, final_state) -> dict:
    """The diversity history X against the prompts the attacker wrote: capacity, prompts seen (attack
    steps x batch), prompts kept (the newest; a ring buffer overwrites the oldest)."""
    stages = np.asarray(sched.stage_at(np.arange(cfg.loop.total_steps), cfg.game.schedule))
    seen = int(np.isin(stages, (sched.ATTACK, sched.BOTH)).sum()) * cfg.game.batch_size
    return {"capacity": cfg.game.history_capacity, "prompts_seen": seen,
            "kept": int(np.asarray(final_state.history.count))}


def rss_bytes(field: str = "VmRSS") -> int | None:
    """This process's resident memory from /proc/self/status (`VmRSS` now, `VmHWM` its peak so far), in
    bytes; None where /proc is not there (macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_report(rss_before_build: int | None, state_bytes: int) -> dict:
    """Peak resident memory of this process against the game state's bytes (results.json's `memory`):
    the absolute peak, the peak above the RSS measured before anything was built (the runtime's and
    the libraries' own memory left out), and that excess as a multiple of the state."""
    peak = rss_bytes("VmHWM")
    out = {"state_bytes": int(state_bytes), "peak_rss_bytes": peak,
           "rss_before_build_bytes": rss_before_build}
    if peak is not None and state_bytes > 0:
        out["peak_per_state"] = peak / state_bytes  # the issue-14 target reads this one: at most 2
    if peak is not None and rss_before_build is not None and state_bytes > 0:
        out["peak_over_baseline_per_state"] = (peak - rss_before_build) / state_bytes
    return out


def notes_markdown(results: dict) -> str:
    """Run-level facts under every setting's tables: the history's capacity, the data notes."""
    lines = ["", "## Run notes", ""]
    h = results.get("history")
    if h:
        full = "all kept" if h["kept"] >= h["prompts_seen"] else f"only the newest {h['kept']} kept"
        lines.append(f"- diversity history X: capacity {h['capacity']}, attacker prompts seen "
                     f"{h['prompts_seen']} ({full})")
    for k, v in results.get("data", {}).items():
        lines.append(f"- {k}: {v}")
    m = results.get("memory")
    if m and m.get("peak_rss_bytes") is not None:
        gib = 2.0**30
        line = (f"- memory: game state {m['state_bytes'] / gib:.3f} GiB; peak resident memory "
                f"{m['peak_rss_bytes'] / gib:.3f} GiB "
                f"({m['peak_rss_bytes'] / m['state_bytes']:.2f}x the state)")
        if "peak_over_baseline_per_state" in m:
            line += (f", {(m['peak_rss_bytes'] - m['rss_before_build_bytes']) / gib:.3f} GiB above the "
                     f"{m['rss_before_build_bytes'] / gib:.3f} GiB before the build "
                     f"({m['peak_over_baseline_per_state']:.2f}x the state)")
        lines.append(line)
    env, load = results.get("environment", {}), results.get("load_average")
    if env.get("processor") and load:
        lines.append(f"- machine: {env['processor']}, {env['cpus']} CPUs; load average {load['start']:.2f} "
                     f"at the start, {load['end']:.2f} at the end (the timings are read against it)")
    return "\n".join(lines) + "\n" if len(lines) > 3 else ""


def write_results(run_dir: pathlib.Path, results: dict, markdown: str) -> pathlib.Path:
    """results.json and results.md in the run folder; returns the Markdown's path."""
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=json_default))
    (run_dir / "results.md").write_text(markdown)
    return run_dir / "results.md"


def make_plots(run_dir: pathlib.Path, cfg) -> list[pathlib.Path]:
    """PNG plots from metrics.jsonl: rewards, attack success, diversity, KL, exploitability (with
    the defend / attack stages shaded)."""
    import matplotlib  # here, not at import: choosing the file-only backend is this function's business

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if "stage" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not steps:
        return []
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    t = np.array([r["step"] for r in steps])

    def series(key, recs=steps):
        return np.array([r.get(key, np.nan) for r in recs], float)

    def shade(ax):
        for start, end, stage in sched.stage_boundaries(cfg.loop.total_steps, cfg.game.schedule):
            if stage == sched.ATTACK:
                ax.axvspan(start, end, color="tab:red", alpha=0.08, lw=0)

    panels = {
        "rewards.png": ("rewards (red band: attack stage)", ["defender/score", "attacker/reward"]),
        "attack_success.png": ("attack success on the training batch",
                               ["attack_success", "attack_success_harmful", "defender/benign_refusal"]),
        "diversity.png": ("attacker similarity to its history (lower = more diverse)",
                          ["attacker/selfbleu_to_history", "attacker/cosine_to_history"]),
        "kl.png": ("KL to the reference (sum over tokens)", ["defender/ppo/kl_ref", "attacker/ppo/kl_ref"]),
    }
    paths = []
    for fname, (title, keys) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for k in keys:
            y = series(k)
            if np.isfinite(y).any():  # NaN (not measured in that stage) breaks the line
                ax.plot(t, y, ".-", ms=2, lw=1, label=k)
        shade(ax)
        ax.set_xlabel("game step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    if evals:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        te = np.array([r["step"] + 1 for r in evals])
        for k in ("eval/best_response_asr", "eval/fraction_exploitable", "eval/asr_train",
                  "eval/asr_heldout_framings", "eval/over_refusal"):
            y = series(k, evals)
            if np.isfinite(y).any():
                ax.plot(te, y, "o-", ms=3, lw=1, label=k)
        shade(ax)
        ax.set_xlabel("game step")
        ax.set_title("defender exploitability and attack success (exact)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "exploitability.png", dpi=110)
        plt.close(fig)
        paths.append(out_dir / "exploitability.png")
    return paths


TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
})


def export_players(run_dir: pathlib.Path, state, spec, tokenizer_dir=None) -> dict:
    """Final policies as HF causal-LM folders (+ the tokenizer files) under run_dir/export/."""
    paths = {}
    for name, params, lm in (("defender", state.defender.policy_params, spec.defender.models.policy_config),
                             ("attacker", state.attacker.policy_params, spec.attacker.models.policy_config)):
        out = save_pretrained(jax.tree.map(np.asarray, params), lm, run_dir / "export" / name)
        if tokenizer_dir is not None and pathlib.Path(tokenizer_dir).exists():
            # only the tokenizer's files: the real setting's tokenizer folder is the defender's checkpoint,
            # whose weights and config.json would otherwise overwrite the exported policy
            for f in pathlib.Path(tokenizer_dir).iterdir():
                if f.is_file() and f.name in TOKENIZER_FILES:
                    shutil.copy(f, out / f.name)
        paths[name] = str(out)
    return paths
