"""One PPO update against an independent PyTorch reference (transformers Llama models, the same
formulas written out in torch: experience under no_grad, then the clipped losses and their backward).

Both update paths are checked: the single pass (the experience's policy and critic forwards are the
update's, `PPOConfig.fuse_experience`) and the separate experience. With SGD at learning rate 1 the
parameter change is minus the gradient, so every gradient leaf is compared by its HF tensor name."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.models import init_critic, load_pretrained
from alignjax.models.hf_io import backbone_to_hf
from alignjax.rl import LlamaPlayerModels, PlayerState, PPOConfig, Rollout, make_ppo_update
from tests.hf_fixtures import hf_positions, make_tiny_hf_checkpoint

B, P, N = 4, 5, 6
KL_COEF, GAMMA, LAM, ENT_COEF, VALUE_COEF = 0.1, 0.97, 0.9, 0.01, 0.7


def make_rollout(vocab: int) -> Rollout:
    """Left-padded prompts of 1..P tokens, right-padded responses of 1..N tokens (row 0 full)."""
    rng = np.random.default_rng(11)
    plen, rlen = rng.integers(1, P + 1, size=B), rng.integers(1, N + 1, size=B)
    rlen[0] = N
    pm = (np.arange(P)[None] >= (P - plen)[:, None]).astype(np.int32)
    rm = (np.arange(N)[None] < rlen[:, None]).astype(np.int32)
    pt = np.where(pm > 0, rng.integers(3, vocab, size=(B, P)), 0).astype(np.int32)
    rt = np.where(rm > 0, rng.integers(3, vocab, size=(B, N)), 0).astype(np.int32)
    scores = rng.normal(size=B).astype(np.float32)
    return Rollout(*map(jnp.asarray, (pt, pm, rt, rm, scores)))


def torch_reference(policy_path, ref_path, head, ro: Rollout):
    """The update in PyTorch -> (policy grads by HF name, critic grads by name, metrics)."""
    import torch
    import transformers

    policy = transformers.LlamaForCausalLM.from_pretrained(policy_path, dtype=torch.float64)
    ref = transformers.LlamaForCausalLM.from_pretrained(ref_path, dtype=torch.float64)
    backbone = transformers.LlamaModel.from_pretrained(policy_path, dtype=torch.float64)
    value_head = torch.nn.Linear(backbone.config.hidden_size, 1).double()
    with torch.no_grad():
        value_head.weight.copy_(torch.tensor(np.asarray(head["kernel"], np.float64))[None])
        value_head.bias.fill_(float(head["bias"]))
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    seq = torch.cat([t(ro.prompt_tokens), t(ro.response_tokens)], 1)[:, :-1].long()
    att_np = np.concatenate([ro.prompt_mask, ro.response_mask], 1)[:, :-1]
    att, pos = torch.tensor(att_np).long(), torch.tensor(hf_positions(att_np)).long()
    resp, m, scores = t(ro.response_tokens).long(), t(ro.response_mask).double(), t(ro.scores).double()

    def logits_of(model):
        return model(input_ids=seq, attention_mask=att, position_ids=pos).logits[:, -N:]

    def logp_of(logits):
        return torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0]

    def values():
        h = backbone(input_ids=seq, attention_mask=att, position_ids=pos).last_hidden_state[:, -N:]
        return value_head(h)[..., 0]

    def mmean(x):
        return (x * m).sum() / m.sum()

    with torch.no_grad():  # the experience
        old_logp, ref_logp, old_v = logp_of(logits_of(policy)) * m, logp_of(logits_of(ref)) * m, values() * m
        rewards = -KL_COEF * (old_logp - ref_logp)
        last = (m.sum(1) - 1).long()
        rewards[torch.arange(B), last] += scores
        rewards = rewards * m
        adv, running = torch.zeros_like(rewards), torch.zeros(B, dtype=torch.float64)
        for step in reversed(range(N)):
            next_v = old_v[:, step + 1] if step + 1 < N else torch.zeros(B, dtype=torch.float64)
            running = rewards[:, step] + GAMMA * next_v - old_v[:, step] + GAMMA * LAM * running * (
                m[:, step + 1] if step + 1 < N else 0.0)  # fmt: skip
            adv[:, step] = running * m[:, step]
        returns = (adv + old_v) * m
        mean = mmean(adv)
        white = (adv - mean) / torch.sqrt(mmean((adv - mean) ** 2) + 1e-8) * m

    logits = logits_of(policy)
    ratio = torch.exp((logp_of(logits) - old_logp) * m)
    pg_loss = mmean(torch.max(-white * ratio, -white * torch.clamp(ratio, 0.8, 1.2)))
    lp = torch.log_softmax(logits, -1)
    entropy = mmean(-(lp.exp() * lp).sum(-1))
    (pg_loss - ENT_COEF * entropy).backward()
    v = values()
    v_clip = old_v + torch.clamp(v - old_v, -0.2, 0.2)
    vf_loss = 0.5 * mmean(torch.max((v - returns) ** 2, (v_clip - returns) ** 2))
    (VALUE_COEF * vf_loss).backward()
    p_grads = {k: p.grad.numpy() for k, p in policy.named_parameters()}
    c_grads = {k: p.grad.numpy() for k, p in backbone.named_parameters()}
    c_grads["head.kernel"] = value_head.weight.grad.numpy()[0]
    c_grads["head.bias"] = value_head.bias.grad.numpy()[0]
    norm = lambda g: float(np.sqrt(sum(np.sum(x**2) for x in g.values())))  # noqa: E731
    metrics = dict(policy_loss=pg_loss.item(), value_loss=vf_loss.item(), entropy=entropy.item(),
                   policy_grad_norm=norm(p_grads), critic_grad_norm=norm(c_grads),
                   kl_ref=(old_logp - ref_logp).sum(1).mean().item(), return_mean=mmean(returns).item(),
                   advantage_mean=mmean(adv).item(), value_mean=mmean(old_v).item())  # fmt: skip
    return p_grads, c_grads, metrics


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_torch")
    return (make_tiny_hf_checkpoint(root, tie_word_embeddings=False, seed=0),
            make_tiny_hf_checkpoint(root, tie_word_embeddings=False, seed=1))  # fmt: skip


@pytest.mark.parametrize("fuse", [True, False], ids=["single_pass", "separate_experience"])
def test_one_update_matches_pytorch(checkpoints, fuse):
    policy_path, ref_path = checkpoints
    pre = load_pretrained(policy_path)
    config, params, ref = pre.config, pre.params, load_pretrained(ref_path).params
    critic = init_critic(config, jax.random.PRNGKey(3), backbone=params, head_std=0.3)
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # new params = params - gradient
    state = PlayerState.create(params, critic, sgd, sgd)
    cfg = PPOConfig(kl_coef=KL_COEF, gamma=GAMMA, lam=LAM, entropy_coef=ENT_COEF, value_coef=VALUE_COEF,
                    clip_ratio=0.2, value_clip=0.2, fuse_experience=fuse)  # fmt: skip
    assert cfg.single_pass == fuse
    ro = make_rollout(config.vocab_size)
    update = jax.jit(make_ppo_update(LlamaPlayerModels(config), cfg))
    new, metrics = update(state, ref, ro, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    chex.assert_shape(list(metrics.values()), ())
    assert float(metrics["update_skipped"]) == 0.0

    p_ref, c_ref, m_ref = torch_reference(policy_path, ref_path, critic["head"], ro)
    minus = lambda a, b: jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y), a, b)  # noqa: E731
    p_ours = minus(state.policy_params, new.policy_params)
    c_ours = minus(state.critic_params, new.critic_params)
    ours = {**backbone_to_hf(p_ours, config, prefix="model."), "lm_head.weight": p_ours["lm_head"].T}
    ours_c = {**backbone_to_hf(c_ours["backbone"], config, prefix=""),
              "head.kernel": c_ours["head"]["kernel"], "head.bias": c_ours["head"]["bias"]}  # fmt: skip
    for got, want in ((ours, p_ref), (ours_c, c_ref)):
        assert sorted(got) == sorted(want)
        for name in want:
            scale = np.max(np.abs(want[name])) + 1e-12
            np.testing.assert_allclose(got[name] / scale, want[name] / scale, atol=2e-4, err_msg=name)
    for k, v in m_ref.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-4, atol=1e-5, err_msg=k)
    assert m_ref["policy_grad_norm"] > 1e-3 and m_ref["critic_grad_norm"] > 1e-3  # a non-vacuous check
