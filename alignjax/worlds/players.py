"""Initial players of the synthetic world: tokenizer folder, SFT corpora, SFT, on-disk cache.

Layout of the cache (one folder per world config, keyed by `WorldConfig.fingerprint()`):

    <cache_dir>/synthetic-<fingerprint>/
        tokenizer/   tokenizer.json, tokenizer_config.json, special_tokens_map.json
        defender/    config.json, model.safetensors (HF LlamaForCausalLM) + the tokenizer files
        attacker/    idem
        world.json   the WorldConfig and the build report (time, final SFT losses)
        DONE         written last: a folder without it is rebuilt

A `filelock.FileLock` on `<cache_dir>/synthetic-<fingerprint>.lock` makes concurrent processes (e.g.
pytest-xdist workers) wait for one build instead of building twice.
"""

from __future__ import annotations

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
import optax
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm

from alignjax.models import hf_io, llama
from alignjax.models.config import LMConfig
from alignjax.sampling import SamplingConfig, sample
from alignjax.worlds import grammar as G

if TYPE_CHECKING:
    from alignjax.worlds.synthetic import Players, SyntheticWorld


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(words: list[str]) -> Tokenizer:
    """WordLevel tokenizer over `words` (special tokens first: <pad>=0 <s>=1 </s>=2 <unk>=3), splitting
    on whitespace and punctuation; `encode(text)` prepends <s> as Llama tokenizers do."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(G.SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", G.BOS_ID)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, folder: pathlib.Path) -> None:
    """tokenizer.json plus the config files `transformers.AutoTokenizer.from_pretrained` needs."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------- sampling


def generate(
    params,
    lm_cfg: LMConfig,
    tokens,
    mask,
    key,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    eos_id: int = G.EOS_ID,
    pad_id: int = G.PAD_ID,
):
    """(tokens [B, N], logprobs [B, N], mask [B, N]) sampled after left-padded prompts [B, P]
    (thin wrapper over alignjax.sampling.sample: plain temperature sampling, or greedy)."""
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
    out = sample(params, lm_cfg, tokens, mask, key, scfg, eos_id, pad_id)
    return out.tokens, out.policy_logprobs, out.mask


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


def defender_corpus(world: SyntheticWorld, n: int, rng: np.random.Generator):
    """n SFT pairs over every prompt of the grammar: (inputs, input_mask, targets, target_mask) numpy."""
    prompts = world.prompts("all")
    picks = [prompts[i] for i in rng.permutation(np.resize(np.arange(len(prompts)), n))]
    x, xm = world.encode([p.text for p in picks], world.max_prompt_len)
    inp, im = world.defender_inputs(x, xm)
    tgt, tm = _encode_responses(
        world, [defender_target(world, p, rng) for p in picks], world.max_response_len
    )
    return np.asarray(inp), np.asarray(im), tgt, tm


def attacker_corpus(world: SyntheticWorld, n: int, rng: np.random.Generator):
    """n SFT pairs (seed from the training split -> rewrite): (inputs, input_mask, targets, target_mask)."""
    seeds = world.prompts("train")
    picks = [seeds[i] for i in rng.integers(len(seeds), size=n)]
    s, sm = world.encode([p.text for p in picks], world.max_prompt_len)
    inp, im = world.attacker_inputs(s, sm)
    rewrites = [attacker_target(world, p, rng).text for p in picks]
    tgt, tm = _encode_responses(world, rewrites, world.max_attack_len)
    return np.asarray(inp), np.asarray(im), tgt, tm


# ----------------------------------------------------------------------------- SFT


def sft_loss(params, lm_cfg: LMConfig, inputs, input_mask, targets, target_mask):
    """Masked next-token cross-entropy of the response tokens:
    mean over response positions t of -log pi(y_t | x, y_<t). inputs [B, P] left-padded, targets [B, N]
    right-padded (EOS included, mask 1)."""
    tokens = jnp.concatenate([inputs, targets], 1)
    attn = jnp.concatenate([input_mask, target_mask], 1)
    loss_mask = jnp.concatenate([jnp.zeros_like(input_mask), target_mask], 1)[:, 1:]
    logits = llama.forward(params, lm_cfg, tokens[:, :-1], attn[:, :-1]).logits
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1)


def sft_train(
    params,
    lm_cfg: LMConfig,
    corpus,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    key,
    desc: str = "SFT",
    progress: bool = True,
    chunk: int = 50,
):
    """AdamW (warm-up + cosine decay, grad clip 1) on random minibatches of `corpus`; returns
    (params, final mean loss of the last chunk). Steps run in jitted `lax.scan` chunks."""
    data = tuple(jnp.asarray(a) for a in corpus)
    n = data[0].shape[0]
    sched = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(steps // 20, 1), max(steps, 2), learning_rate * 0.05
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=0.0))
    opt = tx.init(params)

    @jax.jit
    def run_chunk(params, opt, key):
        def step(carry, k):
            params, opt = carry
            idx = jax.random.randint(k, (batch_size,), 0, n)
            loss, grads = jax.value_and_grad(sft_loss)(params, lm_cfg, *(a[idx] for a in data))
            upd, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, upd), opt), loss

        (params, opt), losses = jax.lax.scan(step, (params, opt), jax.random.split(key, chunk))
        return params, opt, losses.mean()

    loss = float("nan")
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for i in range(0, steps, chunk):
        key, sub = jax.random.split(key)
        params, opt, loss = run_chunk(params, opt, sub)
        loss = float(loss)
        bar.update(min(chunk, steps - i))
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    return params, loss


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> pathlib.Path:
    """$ALIGNJAX_CACHE_DIR, else <repo>/cache when running from a checkout, else ~/.cache/alignjax."""
    if os.environ.get("ALIGNJAX_CACHE_DIR"):
        return pathlib.Path(os.environ["ALIGNJAX_CACHE_DIR"])
    repo = pathlib.Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "cache"
    return pathlib.Path.home() / ".cache" / "alignjax"


def cache_folder(world: SyntheticWorld, cache_dir=None, build_players: bool = True) -> pathlib.Path:
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
    from alignjax.worlds.synthetic import Player, Players

    cfg = world.cfg
    lm_cfg = world.lm_config()
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    k_d, k_a, k_dt, k_at = jax.random.split(key, 4)
    t0 = time.time()
    n = cfg.sft_batch_size * 64
    d_params, d_loss = sft_train(
        llama.init_params(lm_cfg, k_d),
        lm_cfg,
        defender_corpus(world, n, rng),
        steps=cfg.defender_sft_steps,
        batch_size=cfg.sft_batch_size,
        learning_rate=cfg.sft_learning_rate,
        key=k_dt,
        desc="SFT defender",
        progress=progress,
    )
    t1 = time.time()
    a_params, a_loss = sft_train(
        llama.init_params(lm_cfg, k_a),
        lm_cfg,
        attacker_corpus(world, n, rng),
        steps=cfg.attacker_sft_steps,
        batch_size=cfg.sft_batch_size,
        learning_rate=cfg.sft_learning_rate,
        key=k_at,
        desc="SFT attacker",
        progress=progress,
    )
    t2 = time.time()
    report = {
        "defender_sft_seconds": t1 - t0,
        "attacker_sft_seconds": t2 - t1,
        "defender_final_loss": d_loss,
        "attacker_final_loss": a_loss,
    }
    return Players(attacker=Player(a_params, lm_cfg), defender=Player(d_params, lm_cfg)), report


def load_or_build(world: SyntheticWorld, cache_dir=None, progress: bool = True) -> Players:
    """Load the cached players of this world config, building them first (under a file lock) if absent."""
    import dataclasses

    from alignjax.worlds.synthetic import Player, Players

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
