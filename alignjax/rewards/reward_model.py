"""Bradley-Terry reward model: LM backbone + scalar head on the last real token.

Params are `{"backbone": <LM params without lm_head>, "head": {"kernel": [D], "bias": []}}`
(alignjax.models.heads); the score of a sequence is

    r(tokens[b]) = h[b, last real token] . kernel + bias,      h = backbone(tokens, mask)  [B, T] -> [B]

Import from HF `LlamaForSequenceClassification` (and the Mistral / Qwen2 variants) with num_labels = 1:
`score.weight` [1, D] becomes the kernel, the bias is 0 (HF's score layer has none). HF picks the
rightmost token that is not `pad_token_id`; we pick the rightmost token with mask 1, which is the same
token for right-padded rows (where positions 0..T-1 also agree). For left-padded rows we use positions
cumsum(mask) - 1 so the score does not depend on the amount of padding; HF's forward agrees when
given those position_ids (without them it counts pads as positions and the score shifts).

Training: `bt_train_step` minimises the Bradley-Terry loss on (chosen, rejected) pairs

    loss = mean_b -log sigmoid(r(chosen_b) - r(rejected_b))

with any optax optimizer, pure and jittable (`make_bt_train_step` returns the jitted version).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.models import heads, hf_io, llama
from alignjax.models.config import LMConfig
from alignjax.rewards.judge import JudgeOutput
from alignjax.rewards.lm_judge import JudgeTemplate, assemble


class PreferenceBatch(NamedTuple):
    """(chosen, rejected) pairs; tokens int32 [B, T], masks [B, T] (1 real token, 0 pad). The two sides
    share T (pad the shorter one); padding may be left or right."""

    chosen: jax.Array
    chosen_mask: jax.Array
    rejected: jax.Array
    rejected_mask: jax.Array


class RMTrainState(NamedTuple):
    params: heads.CriticParams
    opt_state: optax.OptState
    step: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A loaded reward model. `score(params, tokens [B, T], mask [B, T] = None) -> [B]` is pure and jitted."""

    params: heads.CriticParams
    config: LMConfig

    def score(
        self, params: heads.CriticParams, tokens: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        if mask is None:
            mask = jnp.ones(tokens.shape, jnp.int32)
        return _score(params, self.config, tokens, jnp.asarray(mask))


@functools.partial(jax.jit, static_argnums=1)
def _score(params, config, tokens, mask):
    return heads.reward_forward(params, config, tokens, mask)


def load_reward_model(path: str | os.PathLike, dtype=jnp.float32) -> RewardModel:
    """Load an HF *ForSequenceClassification folder (num_labels must be 1) as a RewardModel."""
    config, arch, raw = hf_io.read_config(path)
    if arch not in hf_io.SEQ_CLS_ARCHITECTURES:
        raise hf_io.CheckpointError(
            f"{path} holds a {arch}; a reward model needs one of {sorted(hf_io.SEQ_CLS_ARCHITECTURES)}"
        )
    num_labels = raw.get("num_labels", len(raw.get("id2label") or {}) or 2)
    if num_labels != 1:
        raise hf_io.CheckpointError(
            f"{path}: num_labels={num_labels}; a scalar reward model needs num_labels=1"
        )
    reader = hf_io.SafetensorsReader(path)
    backbone, used = hf_io.read_backbone(reader, config, dtype, prefix="model.")
    score = reader.get("score.weight", (1, config.hidden_size))
    used |= {"score.weight", "lm_head.weight"}  # a tied / leftover lm_head is not part of a reward model
    hf_io.check_no_unexpected(reader, used)
    head = {"kernel": jnp.asarray(score[0], dtype), "bias": jnp.zeros((), dtype)}
    return RewardModel({"backbone": backbone, "head": head}, config)


def save_reward_model(params: heads.CriticParams, config: LMConfig, path: str | os.PathLike, dtype=None):
    """Write an HF *ForSequenceClassification folder (num_labels=1). HF's score layer has no bias, so a
    nonzero head bias is an error (a constant shift does not change Bradley-Terry preferences; subtract it
    from the scores yourself if that is what you want)."""
    bias = float(np.asarray(params["head"]["bias"]))
    if bias != 0.0:
        raise hf_io.CheckpointError(f"head bias {bias} != 0 cannot be stored in HF's bias-free score layer")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out_dtype = dtype if dtype is not None else params["backbone"]["embed"].dtype
    arch = {v: k for k, v in hf_io.SEQ_CLS_ARCHITECTURES.items()}[config.architecture]
    hf_cfg = hf_io.config_to_hf(config.replace(tie_word_embeddings=False), out_dtype, architecture=arch)
    hf_cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    tensors = hf_io.backbone_to_hf(params["backbone"], config, dtype)
    tensors["score.weight"] = np.ascontiguousarray(hf_io.to_numpy(params["head"]["kernel"], dtype)[None, :])
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    hf_io.write_safetensors(tensors, path, max_shard_bytes=5 * 2**30)
    return path


def _check_batch(batch: PreferenceBatch) -> None:
    chex.assert_rank(batch.chosen, 2)
    chex.assert_equal_shape([batch.chosen, batch.chosen_mask, batch.rejected, batch.rejected_mask])
    chex.assert_type([batch.chosen, batch.rejected], int)


def bt_loss(params: heads.CriticParams, config: LMConfig, batch: PreferenceBatch) -> tuple[jax.Array, dict]:
    """Bradley-Terry loss mean(-log sigmoid(r_c - r_r)) and metrics (accuracy = P(r_c > r_r), ties
    count 1/2; margin = mean(r_c - r_r); mean chosen / rejected rewards). One backbone pass of [2B, T]."""
    _check_batch(batch)
    b = batch.chosen.shape[0]
    tokens = jnp.concatenate([batch.chosen, batch.rejected])
    mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
    r = heads.reward_forward(params, config, tokens, mask)
    r_c, r_r = r[:b], r[b:]
    margin = r_c - r_r
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((margin > 0) + 0.5 * (margin == 0)),
        "margin": jnp.mean(margin),
        "reward_chosen": jnp.mean(r_c),
        "reward_rejected": jnp.mean(r_r),
    }
    return loss, metrics


def init_train_state(params: heads.CriticParams, optimizer: optax.GradientTransformation) -> RMTrainState:
    return RMTrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def bt_train_step(
    state: RMTrainState,
    batch: PreferenceBatch,
    *,
    config: LMConfig,
    optimizer: optax.GradientTransformation,
    axis_name: str | None = None,
) -> tuple[RMTrainState, dict]:
    """One optimizer step on the Bradley-Terry loss. With `axis_name` (inside pmap / shard_map) the
    gradients and metrics are averaged over that axis. Returns (new state, metrics incl. grad_norm)."""
    (_, metrics), grads = jax.value_and_grad(bt_loss, has_aux=True)(state.params, config, batch)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return RMTrainState(params, opt_state, state.step + 1), metrics


def make_bt_train_step(config: LMConfig, optimizer: optax.GradientTransformation):
    """`step(state, batch) -> (state, metrics)`, jitted, the state buffers donated."""
    return jax.jit(functools.partial(bt_train_step, config=config, optimizer=optimizer), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=1)
def bt_eval(params: heads.CriticParams, config: LMConfig, batch: PreferenceBatch) -> dict:
    """Bradley-Terry metrics of a held-out batch (no update)."""
    return bt_loss(params, config, batch)[1]


def init_reward_model(
    config: LMConfig, key: jax.Array, backbone: llama.Params | None = None, dtype=jnp.float32
) -> heads.CriticParams:
    """Fresh reward-model params; the head starts at N(0, 0.02^2) as HF's score layer."""
    return heads.init_critic(config, key, backbone, dtype, head_std=0.02)


# ------------------------------------------------------------------------------------ as a judge


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["config", "template", "offset", "scale", "pad_id"],
)
@dataclasses.dataclass(frozen=True)
class RewardModelJudge:
    """A reward model behind the judge interface (alignjax.rewards.judge.Judge).

    The row prefix + prompt + middle + response + suffix (lm_judge.assemble) is scored, and

        p_safe = sigmoid((r - offset) / scale),   p_unsafe = 1 - p_safe,   unsafe = p_unsafe > p_safe

    so a Bradley-Terry reward r maps to a probability (offset: the reward at which the judge is
    undecided). A pytree whose leaves are the params, like LMJudge.
    """

    params: heads.CriticParams
    config: LMConfig
    template: JudgeTemplate
    offset: float = 0.0
    scale: float = 1.0
    pad_id: int = 0

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    def __call__(self, prompt_tokens, prompt_mask, response_tokens, response_mask):
        return _rm_judge_call(self, prompt_tokens, prompt_mask, response_tokens, response_mask)


@jax.jit
def _rm_judge_call(judge: RewardModelJudge, prompt_tokens, prompt_mask, response_tokens, response_mask):
    tokens, mask = assemble(
        judge.template, prompt_tokens, prompt_mask, response_tokens, response_mask, judge.pad_id
    )
    r = heads.reward_forward(judge.params, judge.config, tokens, mask)
    p_safe = jax.nn.sigmoid((r - judge.offset) / judge.scale)
    p_unsafe = jax.nn.sigmoid(-(r - judge.offset) / judge.scale)
    return JudgeOutput(p_safe, p_unsafe, p_unsafe > p_safe)
