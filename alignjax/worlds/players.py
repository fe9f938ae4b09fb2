"""Initial players of the synthetic world: tokenizer folder, SFT corpora, SFT, on-disk cache.

The SFT is the RL core's (`alignjax.rl.sft.sft_step`: masked next-token cross-entropy on the response
tokens), scanned in jitted chunks over random minibatches of a corpus the world generates.

Layout of the cache (one folder per world config, keyed by `WorldConfig.fingerprint()`):

    <cache_dir>/synthetic-<fingerprint>/
        tokenizer/   tokenizer.json, tokenizer_config.json, special_tokens_map.json
        defender/    config.json, model.safetensors (HF LlamaForCausalLM) + the tokenizer files
        attacker/    idem
        world.json   the WorldConfig and the build report (time, final SFT loss and token accuracy)
        DONE         written last: a folder without it is rebuilt

A `filelock.FileLock` on `<cache_dir>/synthetic-<fingerprint>.lock` makes concurrent processes (e.g.
pytest-xdist workers) wait for one build instead of building twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import time
from typing import TYPE_CHECKING

import filelock
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from alignjax.models import hf_io, llama
from alignjax.models.config import LMConfig
from alignjax.rl import (
    LlamaPlayerModels,
    OptimizerConfig,
    SFTBatch,
    SFTState,
    make_optimizer,
    make_sft_step,
    raise_if_nonfinite,
)
from alignjax.worlds import grammar as G
from alignjax.worlds.base import Player, Players
from alignjax.worlds.tokenizer import save_tokenizer

if TYPE_CHECKING:
    from alignjax.worlds.synthetic import SyntheticWorld


# ----------------------------------------------------------------------------- SFT corpora


def _encode_responses(world: SyntheticWorld, texts: list[str], length: int):
    """Right-padded responses followed by EOS: (tokens [N, length], mask [N, length]) numpy int32."""
    toks, mask = world.encode(texts, length - 1, side="right")
    toks, mask = np.array(toks), np.array(mask)
    n = mask.sum(1)
    toks = np.concatenate([toks, np.full((len(texts), 1), G.PAD_ID, np.int32)], 1)
    mask = np.concatenate([mask, np.zeros((len(texts), 1), np.int32)], 1)
    toks[np.arange(len(texts)), n] = G.EOS_ID
    mask[np.arange(len(texts)), n] = 1
    return toks, mask


def defender_target(world: SyntheticWorld, prompt: G.Prompt, rng: np.random.Generator) -> str:
    """One SFT answer: refuse harmful requests unless the framing is a blind spot (where it complies with
    probability blind_spot_compliance); always comply with benign ones."""
    comply = not prompt.harmful or (
        prompt.framing in world.blind_spots and rng.random() < world.cfg.blind_spot_compliance
    )
    if comply:
        steps = tuple(int(i) for i in rng.choice(len(G.STEPS), 3, replace=False))
        return G.render_compliance(int(rng.integers(len(G.COMPLIANCE_OPENERS))), steps, prompt.topic)
    return G.render_refusal(
        int(rng.integers(len(G.REFUSAL_OPENERS))), int(rng.integers(len(G.REFUSAL_BODIES))), prompt.topic
    )


def attacker_target(world: SyntheticWorld, seed: G.Prompt, rng: np.random.Generator) -> G.Prompt:
    """One SFT rewrite of `seed`: same topic (or, with prob 1 - attacker_keep_topic, another training topic
    of the same kind), framing direct w.p. attacker_direct_prob else uniform over training jailbreaks."""
    cfg = world.cfg
    topic = seed.topic
    if rng.random() > cfg.attacker_keep_topic:
        pool = world.train_harmful_topics if seed.harmful else world.train_benign_topics
        topic = pool[int(rng.integers(len(pool)))]
    jail = world.jailbreak_framings
    if not jail or rng.random() < cfg.attacker_direct_prob:
        framing = "direct"
    else:
        framing = jail[int(rng.integers(len(jail)))]
    variant = int(rng.integers(min(cfg.n_variants, len(G.FRAMINGS[framing]))))
    request = int(rng.integers(cfg.n_requests))
    return G.Prompt(
        G.render_prompt(framing, variant, request, topic), framing, variant, request, topic, seed.harmful
    )


def _corpus(world: SyntheticWorld, inputs, seeds: list[G.Prompt], answers: list[str], answer_len: int):
    """SFTBatch (numpy): the templated `seeds` (inputs = world.defender_inputs or attacker_inputs) as
    prompts, `answers` + EOS as right-padded responses of length answer_len."""
    x, xm = world.encode([p.text for p in seeds], world.max_prompt_len)
    inp, im = inputs(x, xm)
    return SFTBatch(np.asarray(inp), np.asarray(im), *_encode_responses(world, answers, answer_len))


def defender_corpus(world: SyntheticWorld, n: int, rng: np.random.Generator) -> SFTBatch:
    """n SFT pairs (prompt -> answer) cycling over every prompt of the grammar in a random order."""
    prompts = world.prompts("all")
    picks = [prompts[i] for i in rng.permutation(np.resize(np.arange(len(prompts)), n))]
    answers = [defender_target(world, p, rng) for p in picks]
    return _corpus(world, world.defender_inputs, picks, answers, world.max_response_len)


def attacker_corpus(world: SyntheticWorld, n: int, rng: np.random.Generator) -> SFTBatch:
    """n SFT pairs (seed from the training split -> rewrite), seeds drawn with replacement."""
    seeds = world.prompts("train")
    picks = [seeds[i] for i in rng.integers(len(seeds), size=n)]
    rewrites = [attacker_target(world, p, rng).text for p in picks]
    return _corpus(world, world.attacker_inputs, picks, rewrites, world.max_attack_len)


# ----------------------------------------------------------------------------- SFT


def sft_optimizer(learning_rate: float, steps: int) -> OptimizerConfig:
    """The players' SFT optimizer: AdamW(b1 0.9, b2 0.98, eps 1e-8, no weight decay) after clipping at
    global norm 1; lr warms up linearly over the first 5% of the steps, then decays (cosine) to 5% of
    the peak at the last step."""
    warmup = max(steps // 20, 1)
    return OptimizerConfig(
        learning_rate=learning_rate,
        schedule="cosine",
        warmup_steps=warmup,
        decay_steps=max(steps - warmup, 1),
        min_lr_ratio=0.05,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )


@functools.partial(jax.jit, static_argnames=("lm_cfg", "batch_size", "length"))
def _sft_chunk(state: SFTState, corpus: SFTBatch, key, *, lm_cfg: LMConfig, batch_size: int, length: int):
    """`length` steps of `rl.sft.sft_step`, each on `batch_size` rows of `corpus` drawn with replacement:
    (state, metrics stacked [length])."""
    step = make_sft_step(LlamaPlayerModels(lm_cfg))
    n = corpus.prompt_tokens.shape[0]

    def body(state, k):
        idx = jax.random.randint(k, (batch_size,), 0, n)
        return step(state, jax.tree.map(lambda a: a[idx], corpus))

    return jax.lax.scan(body, state, jax.random.split(key, length))


def sft_train(
    params,
    lm_cfg: LMConfig,
    corpus: SFTBatch,
    opt: OptimizerConfig,
    *,
    steps: int,
    batch_size: int,
    key,
    desc: str = "SFT",
    progress: bool = True,
    chunk: int = 50,
):
    """`steps` SFT steps (the RL core's `sft_step`: masked next-token cross-entropy on the response) on
    random minibatches of `corpus`, run in jitted `lax.scan` chunks of `chunk` steps.

    Returns (params, {"loss", "token_accuracy"}: means over the last chunk). Raises `NonFiniteError`
    after a chunk in which a step met NaN/inf."""
    state = SFTState.create(params, make_optimizer(opt))
    corpus = SFTBatch(*(jnp.asarray(a, jnp.int32) for a in corpus))
    summary = {"loss": float("nan"), "token_accuracy": float("nan")}
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for done in range(0, steps, chunk):
        key, sub = jax.random.split(key)
        length = min(chunk, steps - done)
        state, metrics = _sft_chunk(state, corpus, sub, lm_cfg=lm_cfg, batch_size=batch_size, length=length)
        raise_if_nonfinite(metrics)
        summary = {k: float(jnp.mean(metrics[k])) for k in summary}
        bar.update(length)
        bar.set_postfix(loss=f"{summary['loss']:.3f}")
    bar.close()
    return state.params, summary


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> pathlib.Path:
    """$ALIGNJAX_CACHE_DIR, else <repo>/cache when running from a checkout, else ~/.cache/alignjax."""
    if os.environ.get("ALIGNJAX_CACHE_DIR"):
        return pathlib.Path(os.environ["ALIGNJAX_CACHE_DIR"])
    repo = pathlib.Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "cache"
    return pathlib.Path.home() / ".cache" / "alignjax"


def cache_folder(world: SyntheticWorld, cache_dir=None) -> pathlib.Path:
    """<cache_dir>/synthetic-<fingerprint>/, with its tokenizer/ folder written (under the file lock)."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"synthetic-{world.cfg.fingerprint()}"
    if not (folder / "tokenizer" / "tokenizer.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(root / f"synthetic-{world.cfg.fingerprint()}.lock")):
            if not (folder / "tokenizer" / "tokenizer.json").exists():
                save_tokenizer(world.tokenizer, folder / "tokenizer")
    return folder


def build_players(world: SyntheticWorld, progress: bool = True) -> tuple[Players, dict]:
    """SFT both players from random init; returns (Players, report)."""
    cfg = world.cfg
    lm_cfg = world.lm_config()
    rng = np.random.default_rng(cfg.seed)
    k_d, k_a, k_dt, k_at = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
    n = cfg.sft_batch_size * 64
    built, report = {}, {}
    for name, corpus, steps, k_init, k_train in (
        ("defender", defender_corpus, cfg.defender_sft_steps, k_d, k_dt),
        ("attacker", attacker_corpus, cfg.attacker_sft_steps, k_a, k_at),
    ):
        t0 = time.time()
        params, summary = sft_train(
            llama.init_params(lm_cfg, k_init),
            lm_cfg,
            corpus(world, n, rng),
            sft_optimizer(cfg.sft_learning_rate, steps),
            steps=steps,
            batch_size=cfg.sft_batch_size,
            key=k_train,
            desc=f"SFT {name}",
            progress=progress,
        )
        built[name] = Player(params, lm_cfg)
        report[f"{name}_sft_seconds"] = time.time() - t0
        report.update({f"{name}_final_{k}": v for k, v in summary.items()})
    return Players(**built), report


def load_or_build(world: SyntheticWorld, cache_dir=None, progress: bool = True) -> Players:
    """Load the cached players of this world config, building them first (under a file lock) if absent."""
    folder = cache_folder(world, cache_dir)
    lock = filelock.FileLock(str(folder.parent / f"synthetic-{world.cfg.fingerprint()}.lock"))
    with lock:
        if not (folder / "DONE").exists():
            players, report = build_players(world, progress=progress)
            for name in ("attacker", "defender"):
                out = folder / name
                if out.exists():
                    shutil.rmtree(out)
                hf_io.save_pretrained(getattr(players, name).params, getattr(players, name).config, out)
                for f in (folder / "tokenizer").iterdir():
                    shutil.copy(f, out / f.name)
            (folder / "world.json").write_text(
                json.dumps({"world_config": dataclasses.asdict(world.cfg), "build": report}, indent=2)
            )
            (folder / "DONE").write_text("ok\n")
            return players
    loaded = {}
    for name in ("attacker", "defender"):
        pre = hf_io.load_pretrained(folder / name)
        # keep the world's LMConfig (HF round trip may not preserve max_position_embeddings etc.)
        loaded[name] = Player(pre.params, world.lm_config())
    return Players(**loaded)
