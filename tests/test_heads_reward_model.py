"""Value / reward heads and the Bradley-Terry reward model.

References: Python loops (last real token), HF PyTorch `LlamaModel` hidden states + a NumPy head
(values), HF `LlamaForSequenceClassification` (reward scores, 1e-4), the closed-form BT loss on HF's
scores, and a synthetic preference that a reward model must learn.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.models import LMConfig, gather_last, init_critic, last_token_index, value_forward
from alignjax.models.hf_io import CheckpointError
from alignjax.rewards import reward_model as rm
from tests.hf_fixtures import (
    hf_logits,
    hf_positions,
    load_hf_model,
    make_tiny_hf_checkpoint,
    random_left_padded,
)

B, T, V = 4, 10, 1000


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory):
    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("rm"), family="llama", seq_cls=True)
    return path, load_hf_model(path, seq_cls=True)


def _right_padded(rng, batch, length, vocab, pad_id=0):
    lengths = rng.integers(2, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask == 1, rng.integers(3, vocab, size=(batch, length)), pad_id).astype(np.int32)
    return tokens, mask


def _hf_scores(hf, tokens, mask):
    """HF's own scoring of right-padded rows: attention_mask, default positions, pad_token_id rule."""
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    return out.double().numpy()[:, 0]


def test_last_token_index_matches_python_loop():
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 9)) < 0.6).astype(np.int32)
    mask[:, 0] = 1  # every row has a real token; holes, left and right padding all occur
    ref = [max(t for t in range(9) if mask[b, t]) for b in range(64)]
    idx = last_token_index(jnp.asarray(mask))
    chex.assert_shape(idx, (64,))
    chex.assert_type(idx, jnp.int32)
    np.testing.assert_array_equal(np.asarray(idx), ref)
    x = rng.normal(size=(64, 9, 3)).astype(np.float32)
    last = gather_last(jnp.asarray(x), jnp.asarray(mask))
    chex.assert_shape(last, (64, 3))
    np.testing.assert_array_equal(np.asarray(last), x[np.arange(64), ref])


def test_value_forward_matches_hf_hidden_states_and_numpy_head(seq_cls):
    import torch

    path, hf = seq_cls
    model = rm.load_reward_model(path)
    tokens, mask = random_left_padded(np.random.default_rng(1), B, T, V, min_len=3)
    critic = init_critic(model.config, jax.random.key(0), backbone=model.params["backbone"], head_std=0.5)
    critic["head"]["bias"] = jnp.asarray(0.3)
    values = jax.jit(value_forward, static_argnums=1)(critic, model.config, tokens, mask)
    chex.assert_shape(values, (B, T))
    chex.assert_type(values, jnp.float32)
    values = np.asarray(values)
    with torch.no_grad():
        h = (
            hf.model(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(hf_positions(mask)),
            )
            .last_hidden_state.double()
            .numpy()
        )
    ref = h @ np.asarray(critic["head"]["kernel"], np.float64) + 0.3
    assert values.shape == (B, T)
    np.testing.assert_allclose(values[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)
    assert "lm_head" not in critic["backbone"]


def test_reward_scores_match_hf_sequence_classification(seq_cls):
    path, hf = seq_cls
    model = rm.load_reward_model(path)
    assert model.params["head"]["kernel"].shape == (64,)
    rng = np.random.default_rng(2)
    # Right padding with pad_token_id: HF's own rule (rightmost non-pad token), no position_ids needed.
    tokens, mask = _right_padded(rng, 6, T, V)
    ours = model.score(model.params, tokens, mask)
    chex.assert_shape(ours, (6,))
    chex.assert_tree_all_finite(ours)
    ours = np.asarray(ours)
    ref = _hf_scores(hf, tokens, mask)
    assert np.std(ref) > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # Left padding: equal to HF given position_ids = cumsum(mask) - 1, hence to the unpadded score.
    tokens_l, mask_l = random_left_padded(rng, 6, T, V, min_len=2)
    ours_l = model.score(model.params, tokens_l, mask_l)
    chex.assert_shape(ours_l, (6,))
    ours_l = np.asarray(ours_l)
    np.testing.assert_allclose(ours_l, hf_logits(hf, tokens_l, mask_l)[:, 0], atol=1e-4, rtol=0)
    for b in range(6):
        real = tokens_l[b][mask_l[b] == 1][None]
        np.testing.assert_allclose(ours_l[b], hf_logits(hf, real)[0, 0], atol=1e-4, rtol=0)


def test_reward_model_export_is_read_by_hf(seq_cls, tmp_path):
    path, hf = seq_cls
    model = rm.load_reward_model(path)
    out = rm.save_reward_model(model.params, model.config, tmp_path / "rm")
    hf2 = load_hf_model(out, seq_cls=True)
    tokens, mask = _right_padded(np.random.default_rng(3), B, T, V)
    np.testing.assert_array_equal(hf_logits(hf2, tokens), hf_logits(hf, tokens))
    again = rm.load_reward_model(out)
    for a, b in zip(
        jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(again.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = {**model.params, "head": {**model.params["head"], "bias": jnp.asarray(1.0)}}
    with pytest.raises(CheckpointError, match="bias"):
        rm.save_reward_model(bad, model.config, tmp_path / "bad")


def test_bt_loss_equals_closed_form_on_hf_scores(seq_cls):
    path, hf = seq_cls
    model = rm.load_reward_model(path)
    rng = np.random.default_rng(4)
    c, cm = _right_padded(rng, B, T, V)
    r, rmask = _right_padded(rng, B, T, V)
    batch = rm.PreferenceBatch(*map(jnp.asarray, (c, cm, r, rmask)))
    metrics = rm.bt_eval(model.params, model.config, batch)
    chex.assert_shape([metrics["loss"], metrics["accuracy"], metrics["margin"]], ())
    chex.assert_tree_all_finite(metrics)
    margin = _hf_scores(hf, c, cm) - _hf_scores(hf, r, rmask)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(np.log1p(np.exp(-margin))), atol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(margin > 0), atol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), np.mean(margin), atol=1e-4)


def test_bt_batch_shapes_are_checked(seq_cls):
    model = rm.load_reward_model(seq_cls[0])
    x = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(AssertionError):
        rm.bt_loss(model.params, model.config, rm.PreferenceBatch(x, x, jnp.ones((2, 6), jnp.int32), x))


def _marker_pairs(rng, n, length, vocab, marker):
    """chosen: random tokens with `marker` at a random place; rejected: random tokens without it.
    Random left padding on both sides."""

    def side(with_marker):
        tokens, mask = random_left_padded(rng, n, length, vocab, min_len=3)
        tokens = np.where(tokens == marker, marker + 1, tokens)
        if with_marker:
            lengths = mask.sum(1)
            where = length - 1 - rng.integers(0, lengths)
            tokens[np.arange(n), where] = marker
        return tokens, mask

    return rm.PreferenceBatch(*map(jnp.asarray, (*side(True), *side(False))))


def test_bt_training_learns_a_synthetic_preference():
    config = LMConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1
    )
    params = rm.init_reward_model(config, jax.random.key(0))
    optimizer = optax.adam(3e-3)
    state = rm.init_train_state(params, optimizer)
    step = rm.make_bt_train_step(config, optimizer)
    rng = np.random.default_rng(0)
    test_batch = _marker_pairs(rng, 256, 8, 32, marker=5)
    state_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    before = rm.bt_eval(state.params, config, test_batch)
    for _ in range(40):
        state, metrics = step(state, _marker_pairs(rng, 32, 8, 32, marker=5))
    after = rm.bt_eval(state.params, config, test_batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state_shapes)
    chex.assert_tree_all_finite(state.params)
    chex.assert_shape([metrics["loss"], metrics["grad_norm"], after["loss"], after["accuracy"]], ())
    assert int(state.step) == 40
    assert float(before["accuracy"]) < 0.75
    assert float(after["accuracy"]) >= 0.95, after
    assert float(after["loss"]) < float(before["loss"])
    assert np.isfinite(float(metrics["grad_norm"]))


def test_reward_model_judge_scores_assembled_rows_like_hf(seq_cls):
    from alignjax.rewards.lm_judge import JudgeTemplate

    path, hf = seq_cls
    model = rm.load_reward_model(path)
    template = JudgeTemplate(prefix=(1, 7), middle=(8,), suffix=(9, 10))
    judge = rm.RewardModelJudge(model.params, model.config, template, offset=0.2, scale=0.5)
    rng = np.random.default_rng(6)
    pt, pm = random_left_padded(rng, B, 5, V, min_len=1)
    rt, rmask = _right_padded(rng, B, 6, V)
    out = judge(pt, pm, rt, rmask)
    chex.assert_shape([out.p_safe, out.p_unsafe, out.unsafe], (B,))
    chex.assert_type([out.p_safe, out.p_unsafe], jnp.float32)
    chex.assert_type(out.unsafe, jnp.bool_)
    for b in range(B):
        seq = [1, 7, *pt[b][pm[b] == 1], 8, *rt[b][rmask[b] == 1], 9, 10]
        r = hf_logits(hf, np.asarray([seq]))[0, 0]
        p_safe = 1 / (1 + np.exp(-(r - 0.2) / 0.5))
        np.testing.assert_allclose(float(out.p_safe[b]), p_safe, atol=1e-5)
        np.testing.assert_allclose(float(out.p_unsafe[b]), 1 - p_safe, atol=1e-5)
        assert bool(out.unsafe[b]) == (p_safe < 0.5)


def test_bt_train_step_pmean_over_devices_equals_full_batch_step():
    """Two equal shards under pmap with axis_name: mean of shard gradients = full-batch gradient."""
    import functools

    config = LMConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    optimizer = optax.sgd(0.1)
    state = rm.init_train_state(rm.init_reward_model(config, jax.random.key(1)), optimizer)
    batch = _marker_pairs(np.random.default_rng(7), 8, 6, 32, marker=5)
    full, m_full = jax.jit(functools.partial(rm.bt_train_step, config=config, optimizer=optimizer))(
        state, batch
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(full, state)
    chex.assert_shape(m_full["loss"], ())
    shard = lambda x: x.reshape((2, x.shape[0] // 2) + x.shape[1:])
    pstep = functools.partial(rm.bt_train_step, config=config, optimizer=optimizer, axis_name="d")
    step = jax.pmap(pstep, "d", devices=jax.devices()[:2])
    rep, m_rep = step(
        jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state), jax.tree_util.tree_map(shard, batch)
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(rep.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(b[1]))
    np.testing.assert_allclose(float(m_rep["loss"][0]), float(m_full["loss"]), atol=1e-6)
