"""Attacker reward presets against the spec's closed forms, written out with NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rewards.attacker_reward import AttackerRewardConfig, attacker_reward

RNG = np.random.default_rng(0)
P_SAFE = RNG.random(6).astype(np.float32)
P_UNSAFE = (RNG.random(6) * (1 - P_SAFE)).astype(np.float32)  # LM judge: p_safe + p_unsafe <= 1
BLEU = RNG.random(6).astype(np.float32)
COS = RNG.uniform(-1, 1, 6).astype(np.float32)


def check_reward_output(out, b=6):
    """AttackerReward fields are [B] float32 (finite for finite inputs)."""
    chex.assert_shape([out.reward, out.safety_term, out.diversity_term], (b,))
    chex.assert_type([out.reward, out.safety_term, out.diversity_term], jnp.float32)
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("k", [0.0, 1.0, 5.0, 10.0])
def test_paper_preset(k):
    # -r + k * (R_SelfBLEU + R_Embedding) / 2 with r = p_safe, R_SelfBLEU = -SelfBLEU, R_Embedding = -Cos.
    want = -P_SAFE + k * ((-BLEU) + (-COS)) / 2
    out = attacker_reward(AttackerRewardConfig("paper", k=k), P_SAFE, P_UNSAFE, BLEU, COS)
    check_reward_output(out)
    np.testing.assert_allclose(np.asarray(out.reward), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.safety_term + out.diversity_term), want, atol=1e-6)


def test_authors_code_preset_and_custom_weights():
    out = attacker_reward(AttackerRewardConfig("authors_code"), P_SAFE, P_UNSAFE, BLEU, COS)
    check_reward_output(out)
    np.testing.assert_allclose(np.asarray(out.reward), P_UNSAFE - 5 * BLEU - 1 * COS, atol=1e-6)
    cfg = AttackerRewardConfig("custom", w_unsafe=2.0, w_safe=0.5, w_bleu=0.25, w_cos=3.0)
    out = jax.jit(attacker_reward, static_argnums=0)(cfg, P_SAFE, P_UNSAFE, BLEU, COS)
    check_reward_output(out)
    np.testing.assert_allclose(
        np.asarray(out.reward), 2 * P_UNSAFE - 0.5 * P_SAFE - 0.25 * BLEU - 3 * COS, atol=1e-6
    )


def test_more_similar_prompts_earn_less():
    for preset in ("paper", "authors_code"):
        cfg = AttackerRewardConfig(preset, k=1.0)
        lo = attacker_reward(cfg, P_SAFE, P_UNSAFE, BLEU, COS).reward
        hi = attacker_reward(cfg, P_SAFE, P_UNSAFE, BLEU + 0.1, COS + 0.1).reward
        chex.assert_shape([lo, hi], (6,))
        chex.assert_type([lo, hi], jnp.float32)
        assert np.all(np.asarray(hi) < np.asarray(lo))


def test_bad_config_and_shapes():
    with pytest.raises(ValueError, match="preset"):
        AttackerRewardConfig("gpo")
    with pytest.raises(ValueError, match="selfbleu_form"):
        AttackerRewardConfig(selfbleu_form="corpus")
    with pytest.raises(AssertionError):
        attacker_reward(AttackerRewardConfig(), P_SAFE, P_UNSAFE[:3], BLEU, COS)


def test_similarity_to_history_uses_only_valid_entries():
    from alignjax.rewards import history as hist
    from alignjax.rewards.attacker_reward import similarity_to_history
    from alignjax.rewards.selfbleu import self_bleu_reference

    rng = np.random.default_rng(1)
    h = hist.init(capacity=6, max_len=5, embed_dim=3)
    past = rng.integers(0, 3, (4, 5)).astype(np.int32)
    past_len = np.array([5, 3, 4, 2], np.int32)
    past_emb = rng.normal(size=(4, 3)).astype(np.float32)
    h = hist.add(h, past, past_len, past_emb, np.array([1, 1, 0, 1], bool))  # row 2 is never added
    new = rng.integers(0, 3, (2, 5)).astype(np.int32)
    new_len = np.array([5, 4], np.int32)
    new_emb = rng.normal(size=(2, 3)).astype(np.float32)
    sim = jax.jit(similarity_to_history)(h, new, new_len, new_emb)
    chex.assert_shape([sim.selfbleu, sim.cosine], (2,))
    chex.assert_tree_all_finite(sim)
    kept = [0, 1, 3]
    for i in range(2):
        refs = [past[j, : past_len[j]].tolist() for j in kept]
        assert float(sim.selfbleu[i]) == pytest.approx(
            self_bleu_reference(new[i, : new_len[i]].tolist(), refs), abs=2e-6
        )
        cos = [
            new_emb[i] @ past_emb[j] / np.linalg.norm(new_emb[i]) / np.linalg.norm(past_emb[j]) for j in kept
        ]
        assert float(sim.cosine[i]) == pytest.approx(np.mean(cos), abs=1e-6)
