"""One PPO update of a player (policy + its own critic): alignjax (JAX, jitted) vs an equivalent
PyTorch implementation (transformers `LlamaForCausalLM` policy and reference, `LlamaModel` + linear value
head critic, the same losses and AdamW), same process, same weights, same batch.

    python benchmarks/bench_ppo.py                          # ~134M Llama, batch 8 x (64 + 128) tokens
    ALIGNJAX_BENCH_SMALL=1 python benchmarks/bench_ppo.py   # smoke run, well under a minute

One update of one epoch of one minibatch, in two forms, each timed on both sides:
- separate experience (the authors' and TRL's form): policy, reference and critic forwards without
  gradients, per-token KL rewards, GAE, whitening; then the policy and critic forwards again with
  their backwards, and two AdamW steps with global-norm clipping (5 forwards + 2 backwards);
- single pass (our default for 1 x 1, `PPOConfig.fuse_experience`): the losses' policy and critic
  forwards also give the experience (3 forwards + 2 backwards). The torch side does the same.
Both sides compute logits only on the response positions and the entropy metric under no-grad; fp32
throughout. Compile time (ours, paid once per shape) is printed separately and excluded. The six
timed functions run in interleaved rounds (`timed_interleaved`), so that a machine whose speed drifts
does not favour one side. Both sides' first-update losses are printed so that the equivalence of the
two implementations can be seen, and a parity line compares our two forms' new parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import summary  # noqa: E402
except ImportError:  # run as a script, python benchmarks/<this file>
    import summary  # noqa: E402

from alignjax.models import LMConfig, init_critic, init_params, save_pretrained
from alignjax.rl import (
    LlamaPlayerModels,
    OptimizerConfig,
    PPOConfig,
    Rollout,
    compute_experience,
    make_player_state,
    make_ppo_update,
)

SMALL = os.environ.get("ALIGNJAX_BENCH_SMALL", "") not in ("", "0")
REPEATS = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", "1" if SMALL else "4"))


def max_rel_diff(a, b) -> float:
    """max over leaves of max |a - b| / max |b|."""
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """Median wall time of `repeats` calls of each function (after the caller's warm-up), in rounds that
    call every function once, in an order rotated each round: a machine that slows down or speeds up
    during the run then biases no function against another."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


# Dense bf16 peak FLOP/s per device (vendor datasheets), keyed by a substring of jax's device_kind. MFU is
# stated against it, the usual convention, whatever dtype the benchmark computes in.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                   "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def model_flops(config: LMConfig, tokens: int) -> float:
    """Model FLOPs of one single-pass PPO update (the 2N-per-token-forward rule, N = the weights a token
    multiplies, i.e. all but the input embedding; attention's score products left out): policy,
    reference and critic forwards (3 x 2N) + policy and critic backwards (2 x 4N). The separate
    experience computes the same update with two more forwards (+ 2 x 2N); the MFU counts the former.
    The critic's N is the policy's less lm_head plus a 1-wide head: counted as the policy's (an upper
    bound by V*d/N, 20% at the 134M bench)."""
    embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size  # a lookup, no FLOPs
    n = config.num_params - embed
    return (3 * 2 + 2 * 4) * n * tokens


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)


def torch_side(folder, head, batch, cfg: PPOConfig, lrs):
    """The PyTorch reference, warmed up: returns ({name: a no-argument function running it}, the
    first update's losses)."""
    import torch
    import transformers

    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    backbone = transformers.LlamaModel.from_pretrained(folder, dtype=torch.float32).train()
    value_head = torch.nn.Linear(backbone.config.hidden_size, 1)
    with torch.no_grad():
        value_head.weight.copy_(torch.tensor(np.asarray(head["kernel"]))[None, :])
        value_head.bias.fill_(float(head["bias"]))
    critic_params = list(backbone.parameters()) + list(value_head.parameters())

    def factor(step, w=100):  # the authors' warm-up + inverse-sqrt schedule
        return max(max(step / w, 0.1) if step < w else (w / max(w, step)) ** 0.5, 1e-8)

    opts = []
    for params, lr in ((list(policy.parameters()), lrs[0]), (critic_params, lrs[1])):
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
        opts.append((params, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)))

    prompt, pmask, resp, rmask, scores = (torch.tensor(np.asarray(x)) for x in batch)
    n = resp.shape[1]
    seq = torch.cat([prompt, resp], 1)[:, :-1].long()
    att = torch.cat([pmask, rmask], 1)[:, :-1].long()
    m = rmask.float()
    resp = resp.long()

    def logprobs(model):
        logits = model(input_ids=seq, attention_mask=att, logits_to_keep=n).logits
        return logits, torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0]

    def values():
        h = backbone(input_ids=seq, attention_mask=att).last_hidden_state[:, -n:]
        return value_head(h)[..., 0]

    def mmean(x):
        return (x * m).sum() / m.sum()

    def advantages(logp, ref_logp, v):
        """KL rewards, GAE and whitening from the (masked, no-grad) forwards' outputs."""
        rewards = -cfg.kl_coef * (logp - ref_logp)
        last = (m.sum(1) - 1).long()
        rewards[torch.arange(len(last)), last] += scores
        rewards = rewards * m
        adv = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(n)):
            next_m = m[:, t + 1] if t + 1 < n else torch.zeros_like(running)
            next_v = v[:, t + 1] * next_m if t + 1 < n else torch.zeros_like(running)
            delta = rewards[:, t] + cfg.gamma * next_v - v[:, t]
            running = delta + cfg.gamma * cfg.lam * next_m * running
            adv[:, t] = running
        adv = adv * m
        returns = (adv + v) * m
        mean = mmean(adv)
        var = mmean((adv - mean) ** 2)
        return (adv - mean) * torch.rsqrt(var + 1e-8) * m, returns

    def experience():
        with torch.no_grad():
            _, logp = logprobs(policy)
            _, ref_logp = logprobs(ref)
            v = values() * m
            logp, ref_logp = logp * m, ref_logp * m
            adv, returns = advantages(logp, ref_logp, v)
        return logp, v, adv, returns

    def losses_and_step(logits, logp, v, old_logp, old_v, adv, returns):
        ratio = torch.exp((logp - old_logp) * m)
        pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.clip_ratio, 1 + cfg.clip_ratio))
        pg_loss = mmean(pg)
        with torch.no_grad():
            lp = torch.log_softmax(logits, -1)
            entropy = mmean(-(lp.exp() * lp).sum(-1))
        v_clip = old_v + torch.clamp(v - old_v, -cfg.value_clip, cfg.value_clip)
        vf_loss = 0.5 * mmean(torch.max((v - returns) ** 2, (v_clip - returns) ** 2))
        (pg_loss + vf_loss).backward()
        norms = []
        for params, opt, sched in opts:
            norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return pg_loss.item(), vf_loss.item(), entropy.item(), norms[0], norms[1]

    def update():
        """The separate experience (3 no-grad forwards), then the losses' forwards and backwards."""
        old_logp, old_v, adv, returns = experience()
        logits, logp = logprobs(policy)
        return losses_and_step(logits, logp, values(), old_logp, old_v, adv, returns)

    def update_single_pass():
        """The same fusion as ours: the losses' policy and critic forwards also give the experience."""
        logits, logp = logprobs(policy)
        v = values()
        with torch.no_grad():
            _, ref_logp = logprobs(ref)
            old_logp, old_v = logp.detach() * m, v.detach() * m
            adv, returns = advantages(old_logp, ref_logp * m, old_v)
        return losses_and_step(logits, logp, v, old_logp, old_v, adv, returns)

    print("pytorch: warm-up update ...", flush=True)
    losses = update()  # warm-up, and the losses of the first update for the equivalence check
    update_single_pass()
    fns = {"torch_experience": experience, "torch_separate": update, "torch_single": update_single_pass}
    return fns, losses


def main():
    import torch
    import transformers

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if SMALL:
        config = LMConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=4, max_position_embeddings=512)  # fmt: skip
        b, p, n = 4, 16, 32
    else:
        config = LMConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                          num_heads=12, num_kv_heads=12, max_position_embeddings=2048)  # fmt: skip
        b, p, n = 8, 64, 128
    cfg = PPOConfig(epochs=1, num_minibatches=1, kl_coef=0.01, clip_ratio=0.2, value_clip=0.2)
    lrs = (5e-7, 1.5e-6)  # defender and critic learning rates of the authors' script
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with {threads} "
          f"threads; transformers {transformers.__version__}")  # fmt: skip
    print(f"model: {config.num_params / 1e6:.1f}M params per network (L={config.num_layers}, "
          f"d={config.hidden_size}, V={config.vocab_size}), fp32; batch {b} x ({p} prompt + {n} response) "
          f"tokens; policy + reference + critic; 1 epoch x 1 minibatch; median of {REPEATS}")  # fmt: skip

    params = init_params(config, jax.random.key(0))
    critic = init_critic(config, jax.random.key(1), backbone=params, head_std=0.02)
    rng = np.random.default_rng(0)
    batch = Rollout(
        jnp.asarray(rng.integers(3, config.vocab_size, size=(b, p)), jnp.int32),
        jnp.ones((b, p), jnp.int32),
        jnp.asarray(rng.integers(3, config.vocab_size, size=(b, n)), jnp.int32),
        jnp.ones((b, n), jnp.int32),
        jnp.asarray(rng.uniform(size=b), jnp.float32),
    )

    # ----- PyTorch, on the same weights through an exported HF folder
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(params, config, d)
        torch_fns, losses_pt = torch_side(d, critic["head"], batch, cfg, lrs)
    gc.collect()

    # ----- ours: the single pass (default) and the separate experience (fuse_experience=False)
    models = LlamaPlayerModels(config)
    opt_policy = OptimizerConfig(learning_rate=lrs[0], warmup_steps=100)
    opt_critic = OptimizerConfig(learning_rate=lrs[1], warmup_steps=100)
    state = make_player_state(params, critic, opt_policy, opt_critic)
    ref = jax.tree.map(jnp.copy, params)
    cfg_separate = dataclasses.replace(cfg, fuse_experience=False)
    assert cfg.single_pass and not cfg_separate.single_pass
    update = jax.jit(make_ppo_update(models, cfg))
    update_separate = jax.jit(make_ppo_update(models, cfg_separate))
    experience = jax.jit(functools.partial(compute_experience, models=models, cfg=cfg))
    key = jax.random.PRNGKey(0)

    print("alignjax: compiling ...", flush=True)
    t = time.perf_counter()
    new_state, metrics = jax.block_until_ready(update(state, ref, batch, key))
    t_compile = time.perf_counter() - t
    names = ("policy_loss", "value_loss", "entropy", "policy_grad_norm", "critic_grad_norm")
    losses_ours = tuple(float(metrics[k]) for k in names)
    sep_state, sep_metrics = jax.block_until_ready(update_separate(state, ref, batch, key))
    parity = max_rel_diff((new_state.policy_params, new_state.critic_params),
                          (sep_state.policy_params, sep_state.critic_params))  # fmt: skip
    parity_metrics = max(abs(float(metrics[k]) - float(sep_metrics[k])) for k in names)
    # One player state lives on from here (both forms advance it), beside PyTorch's models: a copy per
    # form would take the two sides past 24 GiB at this size.
    holder = {"state": new_state}
    del state, new_state, sep_state
    gc.collect()

    def updates(fn):
        def run():
            holder["state"], _ = jax.block_until_ready(fn(holder["state"], ref, batch, key))

        return run

    def run_experience():
        s = holder["state"]
        jax.block_until_ready(experience(s.policy_params, s.critic_params, ref, batch))

    run_experience()  # compiles
    print(f"timing: {REPEATS} rounds of the six, interleaved ...", flush=True)
    t = timed_interleaved({**torch_fns, "experience": run_experience, "single": updates(update),
                           "separate": updates(update_separate)}, REPEATS)  # fmt: skip
    t_exp, t_upd, t_sep = t["experience"], t["single"], t["separate"]
    t_exp_pt, t_upd_pt, t_single_pt = t["torch_experience"], t["torch_separate"], t["torch_single"]

    # (the first minibatch has ratio 1, so its policy loss is -mean(whitened A) = 0: the policy
    # gradient norm is the informative check)
    print("first update: policy loss, value loss, entropy, policy grad norm, critic grad norm")
    for who, vals in (("ours", losses_ours), ("pytorch", losses_pt)):
        print(f"  {who:8s}" + " ".join(f"{v: .6g}" for v in vals))
    print(f"parity, single pass against the separate experience (ours): new params max relative difference "
          f"{parity:.2e}, metrics above max absolute difference {parity_metrics:.2e}")  # fmt: skip
    print(f"{'':44s}{'alignjax':>10s}{'pytorch':>10s}{'pytorch/ours':>14s}")
    rows = [
        ("experience (3 forwards + GAE)", t_exp, t_exp_pt),
        ("update, separate experience (5 fwd + 2 bwd)", t_sep, t_upd_pt),
        ("  of which optimisation step", t_sep - t_exp, t_upd_pt - t_exp_pt),
        ("update, single pass (3 fwd + 2 bwd)", t_upd, t_single_pt),
    ]
    for name, ours, theirs in rows:
        print(f"{name:44s}{ours:9.3f}s{theirs:9.3f}s{theirs / ours:13.2f}x")
    print(f"ours, single pass against separate experience: {t_sep / t_upd:.2f}x faster; against PyTorch's "
          f"update with the separate experience (the authors' and TRL's form): {t_upd_pt / t_upd:.2f}x")
    print(f"compile (ours, once per shape): {t_compile:.1f}s (first call, includes one update)")
    summary.record("ppo_update_s", round(t_upd, 3))
    summary.record("ppo_update_torch_s", round(t_single_pt, 3))
    summary.record("ppo_speedup_vs_torch", round(t_single_pt / t_upd, 3))  # like for like: both single pass
    summary.record("ppo_separate_s", round(t_sep, 3))
    summary.record("ppo_separate_torch_s", round(t_upd_pt, 3))
    summary.record("ppo_separate_speedup_vs_torch", round(t_upd_pt / t_sep, 3))
    summary.record("ppo_single_pass_gain", round(t_sep / t_upd, 3))
    summary.record("ppo_single_pass_parity_max_rel", parity)
    flops = model_flops(config, b * (p + n))
    peak = peak_flops(jax.devices()[0])
    mfu = f"MFU {flops / t_upd / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else \
        f"MFU n/a (no peak FLOP/s on record for {jax.devices()[0].device_kind!r})"
    print(f"PPO update: {flops / 1e12:.2f} model TFLOP in {t_upd:.3f}s = {flops / t_upd / 1e9:.1f} GFLOP/s "
          f"(ours, single pass; pytorch {flops / t_single_pt / 1e9:.1f}); {mfu}")


if __name__ == "__main__":
    main()
