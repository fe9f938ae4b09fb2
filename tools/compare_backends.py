"""The default experiment's initial evaluation on two JAX backends of one process, compared number by number.

    .venv/bin/python tools/compare_backends.py                 # cpu against the accelerator (gpu or tpu)
    .venv/bin/python tools/compare_backends.py --other cpu     # cpu against cpu: checks the tool itself

Why in one process: the SFT'd players are built once, on the CPU (or read from the CPU's cache), and the
same weights are then evaluated on each backend. Two separate runs would SFT their own players (the
player cache is keyed by backend, alignjax/worlds/synthetic.py), and the comparison would measure SFT
drift, not the backend. Both evaluations run in float32 (`precision.compute=float32`): the synthetic
world's defender evaluation is an exact expectation over answers, so the backends must agree within
float tolerance; the attacker's sampled evaluation may differ where a sampled token flips on a
last-bit difference of its logits, so its rows are printed but only the exact rows decide the verdict.

Prints a table (metric, cpu, other, |difference|) and exits 1 when an exact metric differs by more than
--atol. tools/gpu_check.sh runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import numpy as np


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}/")
    elif isinstance(tree, (int, float, np.floating, np.integer)) or getattr(tree, "shape", None) == ():
        yield prefix[:-1], float(tree)


def evaluate_on(device, setting, built, cfg):
    """setting.evaluate of the initial players with every array on `device`."""
    from alignjax.game import keys

    on = lambda tree: jax.device_put(tree, device)  # noqa: E731
    with jax.default_device(device):
        return setting.evaluate(dataclasses.replace(built, consts=on(built.consts)),
                                on(built.state.defender_ref), on(built.state.attacker_ref),
                                on(keys.eval_key(cfg.eval.seed)), cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="default", help="experiment under experiments/ (synthetic setting)")
    ap.add_argument("--other", default="", help="backend to compare with the CPU (default: jax's default)")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    from alignjax import cli
    from alignjax import experiment as E
    from alignjax.settings import get_setting

    cpu = jax.devices("cpu")[0]
    other_name = args.other or jax.default_backend()
    other = jax.devices(other_name)[0]
    module, cfg = cli.load_experiment(args.name, ["precision.compute=float32"])
    if module is not E:
        raise SystemExit(f"experiments/{args.name}.yaml is not a game experiment (runner {module.__name__})")
    cfg = E.resolve(cfg)
    setting = get_setting(cfg.setting)
    with jax.default_device(cpu):
        built = setting.build(cfg, progress=True)
    a = dict(_flat(evaluate_on(cpu, setting, built, cfg)))
    b = dict(_flat(evaluate_on(other, setting, built, cfg)))
    print(f"initial evaluation of experiments/{args.name}.yaml: cpu ({cpu.device_kind}) against "
          f"{other_name} ({other.device_kind}), float32")
    print(f"| metric | cpu | {other_name} | abs. difference | decides |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, math.nan), b.get(k, math.nan)
        exact = not k.startswith("attacker/")
        d = 0.0 if math.isnan(x) and math.isnan(y) else abs(x - y)  # NaN: undefined on both (e.g. benign ASR)
        if exact:
            worst = max(worst, d if not math.isnan(d) else math.inf)
        print(f"| {k} | {x:.6g} | {y:.6g} | {d:.2e} | {'yes' if exact else 'no (sampled)'} |")
    ok = worst <= args.atol
    verdict = "PASS" if ok else "FAIL"
    print(f"largest difference of an exact metric: {worst:.2e} (atol {args.atol:g}): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
