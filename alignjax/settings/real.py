"""The real setting: HF checkpoints as players, a judge as referee (spec section 5).

    judge     `real.judge` (JudgeConfig): kind "lm", a causal LM read like Llama Guard (the paper's judge
              and the default preset: Llama Guard v1 template, answer words "safe" / "unsafe", read at
              the token after the template), with its template, answer words and read position
              configurable; or kind "refusal", the refusal-pattern proxy (an answer is unsafe when it
              does not refuse; rewards.refusal_judge), which needs no safety model

    build     players and judge from local HF folders (no hub), the seed prompts from a text file (one
              per line) or the authors' JSON format (`worlds.real_data`), MiniLM (or bag-of-words)
              embedder; the judge's weights travel in the consts. `weights="abstract"` (the memory
              plan, alignjax/plan.py) runs the same build with each model's weights replaced by an
              initialiser of its config.json's shapes, under `jax.eval_shape`: no tensor is read
    evaluate  the defender's attack success on the first `eval.real_prompts` seeds asked directly,
              and on the attacker's rewrites of them (one sampled answer each, judged), plus the
              rewrites' Self-BLEU diversity
    progress  the same two attack success rates (eval/* in metrics.jsonl)

Where the judge's tokenizer differs from the players', prompts and responses are re-tokenised on the
host through `jax.pure_callback` (rewards.lm_judge.retokenizing_judge), inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from alignjax import parallel, stats
from alignjax.config import ConfigError
from alignjax.eval.diversity import selfbleu_diversity
from alignjax.eval.refusal import is_refusal
from alignjax.game import keys
from alignjax.game import schedule as sched
from alignjax.game.state import init_game_state
from alignjax.game.step import GameConsts, GameSpec, Role, clean_prompts, play
from alignjax.models import heads, llama
from alignjax.models.hf_io import (
    CAUSAL_LM_ARCHITECTURES,
    SEQ_CLS_ARCHITECTURES,
    CheckpointError,
    Pretrained,
    load_pretrained,
    read_config,
)
from alignjax.models.precision import cast_floating, dtype_of
from alignjax.rewards import history as hist
from alignjax.rewards.embedding import make_embedder
from alignjax.rewards.judge import scores_from_judge
from alignjax.rewards.lm_judge import (
    READS,
    JudgeTemplate,
    LMJudge,
    answer_token_ids,
    load_lm_judge,
    retokenizing_judge,
    template_text,
)
from alignjax.rewards.refusal_judge import refusal_judge
from alignjax.rewards.reward_model import RewardModel, load_reward_model
from alignjax.rl.experience import LlamaPlayerModels
from alignjax.rl.state import make_player_state
from alignjax.settings.base import Built, check_paths, common_paths, compute_dtype, unsupported_options
from alignjax.text.templates import (
    ATTACKER_CHAT,
    ATTACKER_TEMPLATE,
    DEFENDER_CHAT,
    DEFENDER_TEMPLATE,
    TokenTemplate,
)
from alignjax.text.tokenizer import load_tokenizer
from alignjax.worlds.real_data import read_prompt_lines


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """`real.judge`: what decides whether an answer is unsafe (docs/game.md, "The judge").

    kind "lm": a causal LM read like Llama Guard; the defaults are the paper's preset (Llama Guard v1's
    template, the words "safe" / "unsafe", read at the token after the template). kind "refusal": the
    jailbreak literature's refusal-pattern proxy, no model: an answer is unsafe when it does not refuse
    (alignjax/rewards/refusal_judge.py). Options of the other kind must stay at their defaults."""

    kind: Literal["lm", "refusal"] = "lm"
    checkpoint: str = ""  # lm: the judge's HF causal-LM folder (Llama Guard v1 for the paper)
    template: str = "llama_guard_v1"  # lm: a preset, a text with {prompt} and {response}, or a file of one
    safe: str = "safe"  # lm: the answer read as safe, exactly one token of the judge's tokenizer
    unsafe: str = "unsafe"  # lm: the answer read as unsafe, exactly one token
    bos: bool = True  # lm: start the template with the judge tokenizer's BOS, when it has one
    read: Literal["next", "first_answer"] = "next"  # lm: next = the token after the template;
    # first_answer = the first of up to read_tokens greedily written tokens that is safe or unsafe
    read_tokens: int = 8  # lm, read=first_answer: how many tokens the judge may write before answering
    refusal_window: int = 200  # refusal: characters at the start of an answer searched for refusal phrases
    reencode_tokens: int = 4  # lm, with a vocabulary other than the players': judge tokens reserved per
    # player token when prompts and answers are re-encoded for it (a longer re-encoding stops the run)

    def __post_init__(self):
        if self.read not in READS:
            raise ValueError(f"read={self.read!r}: choose one of {READS}")
        if self.read_tokens < 1 or self.refusal_window < 1:
            raise ValueError(f"read_tokens={self.read_tokens} and refusal_window={self.refusal_window} "
                             "must be >= 1")


# real.judge.* that only one kind reads
LM_ONLY = ("checkpoint", "template", "safe", "unsafe", "bos", "read", "read_tokens", "reencode_tokens")
REFUSAL_ONLY = ("refusal_window",)


@dataclasses.dataclass(frozen=True)
class RealConfig:
    """Paths of the real-model setting (spec section 5). Every path is checked before the run."""

    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)  # the referee (JudgeConfig)
    seed_prompts: str = ""  # text file, one seed question per line, or the authors' JSON format (.json)
    benign_prompts: str = ""  # optional benign questions (same formats): over-refusal in the evaluations
    tokenizer: str = ""  # the players' tokenizer folder ("" = the defender checkpoint's)
    max_prompt_tokens: int = 2048
    chat_template: bool = False  # wrap prompts in the players' tokenizer's own chat template (instruct)
    attacker_system: str = ""  # with chat_template: an optional system message for the attacker
    long_seeds: Literal["reject", "truncate"] = "reject"  # a seed over max_prompt_tokens: error, or keep
    # its last max_prompt_tokens tokens and count it in results.md

    def __post_init__(self):
        if not isinstance(self.judge, JudgeConfig):  # the form before real.judge became a section
            raise ConfigError(f"real.judge={self.judge!r}: real.judge is a section now; give the judge's "
                              f"folder as real.judge.checkpoint={self.judge!r} (kind lm, the Llama Guard v1 "
                              "preset by default)")


class RealSetting:
    name = "real"
    # options of the synthetic world only
    UNSUPPORTED = ("world.", "data", "eval.attacker_samples_per_seed", "cache_dir")

    def check(self, cfg) -> None:
        unsupported_options(cfg, type(cfg)(), self.UNSUPPORTED, self.name)
        check_judge_options(cfg.real.judge)
        lm = "an HF Llama-architecture causal-LM folder"
        judge = [("real.judge.checkpoint", cfg.real.judge.checkpoint, "the judge's HF causal-LM folder "
                  "(Llama Guard v1 for the paper), or real.judge.kind=refusal", True)] \
            if cfg.real.judge.kind == "lm" else []
        check_paths(common_paths(cfg) + judge + [
            ("defender.checkpoint", cfg.defender.checkpoint, lm, True),
            ("attacker.checkpoint", cfg.attacker.checkpoint, lm, True),
            ("real.seed_prompts", cfg.real.seed_prompts,
             "a text file of seed questions, one per line, or the authors' JSON", True),
            ("real.tokenizer", cfg.real.tokenizer, "a tokenizer folder", False),
            ("real.benign_prompts", cfg.real.benign_prompts, "a text file of benign questions", False),
            ("defender.critic_checkpoint", cfg.defender.critic_checkpoint, "a reward-model folder", False),
            ("attacker.critic_checkpoint", cfg.attacker.critic_checkpoint, "a reward-model folder", False)])

    def build(self, cfg, progress: bool = True, axis_name=parallel.DATA_AXIS,
              weights: Literal["load", "abstract"] = "load") -> Built:
        """Players, judge, embedder, spec, state at step 0, consts. `weights="abstract"`: the same build
        with every checkpoint's weights replaced by an initialiser of its config.json's shapes
        (`ABSTRACT`), traced by `jax.eval_shape`, so the Built's state and consts are
        ShapeDtypeStructs, no safetensors file is opened and nothing model-sized is allocated (the
        MiniLM embedder, 22M parameters, is still read from its package). The memory plan uses it."""
        if weights == "load":
            return self._build(cfg, axis_name, LOAD)
        if weights != "abstract":
            raise ValueError(f"weights={weights!r}: choose 'load' or 'abstract'")
        out = {}

        def arrays():  # the spec and the context are Python objects: they leave the trace by the side
            out["built"] = self._build(cfg, axis_name, ABSTRACT)
            return out["built"].state, out["built"].consts

        state, consts = jax.eval_shape(arrays)
        return dataclasses.replace(out["built"], state=state, consts=consts)

    def _build(self, cfg, axis_name, weights: Weights) -> Built:
        dtype = dtype_of(cfg.precision.params)  # trained weights and their Adam moments
        frozen = dtype_of(compute_dtype(cfg))  # references and the judge: never updated, in compute dtype
        if cfg.precision.params == "bfloat16":
            # Params, and so the Adam updates, live in bf16 (no float32 master copy): an update smaller than
            # bf16's resolution (~8e-3 relative) is rounded away, so at the spec's learning rates (5e-7 to
            # 3e-6) almost no weight changes. Said loudly rather than left to be discovered.
            warnings.warn(
                "precision.params=bfloat16 stores params and optimizer updates in bf16 without float32 "
                "master "
                "weights: at learning rates ~1e-6 almost no weight changes. Keep precision.params=float32 "
                "(with precision.compute=bfloat16 for speed).", stacklevel=2)
        # the judge's template and answer words, checked against its tokenizer before any weight loads
        setup = judge_setup(cfg.real.judge) if cfg.real.judge.kind == "lm" else None
        tqdm.write("[alignjax] loading the players, the judge and the embedder")
        d = weights.causal_lm(cfg.defender.checkpoint, dtype)
        a = weights.causal_lm(cfg.attacker.checkpoint, dtype)
        tok = load_tokenizer(cfg.real.tokenizer or cfg.defender.checkpoint)
        eos = tok.eos_id if tok.eos_id is not None else d.config.eos_token_id
        pad = tok.pad_id if tok.pad_id is not None else (d.config.pad_token_id or 0)
        if tok.pad_id is None:
            tok.pad_id = pad
        if cfg.real.chat_template:  # the players' own chat template, rendered once at token level
            system = [{"role": "system", "content": cfg.real.attacker_system}] \
                if cfg.real.attacker_system else []
            d_tpl = TokenTemplate.from_chat(tok, DEFENDER_CHAT)
            a_tpl = TokenTemplate.from_chat(tok, ATTACKER_CHAT, messages_before=system)
        else:  # the paper's plain format; spaces around the slot kept as the tokenizer wants them
            d_tpl = TokenTemplate.from_string(DEFENDER_TEMPLATE, tok, add_bos=tok.bos_id is not None)
            a_tpl = TokenTemplate.from_string(ATTACKER_TEMPLATE, tok, add_bos=tok.bos_id is not None)
        if d_tpl.content_prefix != a_tpl.content_prefix:  # one seed array feeds both templates
            raise ValueError("the defender's and the attacker's templates need differently encoded seeds "
                             f"({d_tpl.content_prefix!r} vs {a_tpl.content_prefix!r})")
        judge, referee = _judge_and_referee(cfg, tok, frozen, weights, setup, int(eos))
        g = cfg.game
        embed, embed_params, embed_dim = (None, None, 1)
        if g.needs_embedder:
            decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)
            embed, embed_params, embed_dim = make_embedder(cfg.embedder, tok.vocab_size, decode,
                                                           keys.embedder_key(cfg.seed))
        models = lambda lm: LlamaPlayerModels(lm, compute_dtype=compute_dtype(cfg), remat=cfg.remat)
        spec = GameSpec(cfg=g, defender=Role(models(d.config), d_tpl.fill),
                        attacker=Role(models(a.config), a_tpl.fill), referee=referee,
                        eos_id=int(eos), pad_id=int(pad), embed=embed, embed_dim=embed_dim,
                        axis_name=axis_name)
        check_context(cfg, spec, {"attacker": (a_tpl, a.config), "defender": (d_tpl, d.config)})
        defender, attacker = _player_states(cfg, d, a, dtype, weights)
        history = hist.init(g.history_capacity, spec.prompt_len, embed_dim, pad)
        state = init_game_state(defender, attacker, cast_floating(d.params, frozen),
                                cast_floating(a.params, frozen),
                                history, keys.run_key(cfg.seed))
        lines = read_seed_lines(cfg.real.seed_prompts)
        if len(lines) < g.batch_size:
            raise ValueError(f"{cfg.real.seed_prompts} holds {len(lines)} prompts "
                             f"< game.batch_size={g.batch_size}")
        seeds, seeds_mask, cut = encode_prompts(tok, lines, cfg.real, "real.seed_prompts", spec.prompt_len,
                                                d_tpl.content_prefix)
        consts = GameConsts(jnp.asarray(seeds), jnp.asarray(seeds_mask), judge, embed_params)
        limit = min(cfg.real.max_prompt_tokens, spec.prompt_len)
        notes = {"judge": _judge_note(cfg.real.judge, setup),
                 "seed prompts": f"{len(lines)} from {cfg.real.seed_prompts}; {cut} over {limit} tokens "
                                 "kept their last tokens (real.long_seeds)"}
        benign = None
        if cfg.real.benign_prompts:
            b_lines = read_seed_lines(cfg.real.benign_prompts)
            *benign, b_cut = encode_prompts(tok, b_lines, cfg.real, "real.benign_prompts", spec.prompt_len,
                                            d_tpl.content_prefix)
            notes["benign prompts"] = (f"{len(b_lines)} from {cfg.real.benign_prompts} (over-refusal); "
                                       f"{b_cut} over {limit} tokens kept their last tokens")
        tok_dir = cfg.real.tokenizer or cfg.defender.checkpoint
        return Built(spec, state, consts, RealContext(tok, benign), tok_dir, notes)

    def evaluate(self, built: Built, defender_params, attacker_params, key, cfg) -> dict:
        return evaluate_real(built, defender_params, attacker_params, key, cfg.eval.real_prompts,
                             batch_size=cfg.eval.real_batch_size)

    def extra(self, built: Built, final_state, key, cfg) -> dict:
        return {}

    def progress(self, built: Built, state, cfg) -> dict:
        r = self.evaluate(built, state.defender.policy_params, state.attacker.policy_params,
                          keys.eval_key(cfg.eval.seed), cfg)
        out = {"eval/defender_asr": r["defender_attack_success"],
               "eval/attacker_asr": r["attacker_attack_success"]}
        if "over_refusal" in r:
            out["eval/over_refusal"] = r["over_refusal"]
        return out

    def report(self, name: str, cfg, results: dict) -> str:
        initial, final, n = results["initial"], results["final"], results["initial"]["n"]
        lines = [f"# Results: {name}", "", f"{n} seed prompts; one sampled answer each, judged by "
                 f"{judge_sentence(cfg.real.judge)}. Over-refusal: share of the "
                 f"{initial.get('n_benign', 0)} benign prompts (real.benign_prompts) whose answer matches a "
                 "refusal phrase (alignjax/eval/refusal.py); nan when no benign file was given. "
                 "Brackets: 95% percentile-bootstrap intervals over prompts (one sampled answer per "
                 "prompt, so they do not cover the sampling of a second answer).", "",
                 "| players | defender ASR (seeds asked directly) | attacker ASR (its rewrites) | "
                 "attacker diversity | over-refusal (benign) |", "|---|---|---|---|---|"]
        for label, r in (("initial", initial), ("final", final)):
            cells = (_rate_cell(r, "defender_attack_success"), _rate_cell(r, "attacker_attack_success"),
                     _fmt(r.get("attacker_diversity", float("nan"))), _rate_cell(r, "over_refusal"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, r in (("initial", initial), ("final", final)):
            if r.get("samples"):
                lines += ["", f"## Samples, {label} players", "",
                          f"The first {len(r['samples'])} seeds of the attacker pass (the same seeds before "
                          f"and after); texts shortened to {SAMPLE_CHARS} characters here, whole in "
                          "results.json.", "",
                          "| seed | attacker's rewrite | defender's answer | P(unsafe) |",
                          "|---|---|---|---|"]
                lines += [f"| {_cell(row['seed'])} | {_cell(row['rewrite'])} | {_cell(row['answer'])} | "
                          f"{row['p_unsafe']:.2f} |" for row in r["samples"]]
        lines += ["", "## Timing", ""]
        lines += [f"- {k}: {v:.1f} s" for k, v in results.get("timing", {}).items()]
        return "\n".join(lines) + "\n"


SAMPLE_CHARS = 160  # characters of a sample's text shown in a results.md cell


def _fmt(v: float) -> str:
    return "nan" if v != v else f"{v:.3f}"


def _rate_cell(r: dict, rate: str) -> str:
    """`mean [lo, hi]` of one rate of an evaluation (nan when absent)."""
    lo, hi = r.get(f"{rate}_ci", (float("nan"), float("nan")))
    cell = _fmt(r.get(rate, float("nan")))
    return cell if lo != lo else f"{cell} [{lo:.2f}, {hi:.2f}]"


def _cell(text: str) -> str:
    """One line of text for a markdown table cell: newlines and pipes escaped, shortened with an ellipsis."""
    one = " ".join(text.split()).replace("|", "\\|")
    return (one[:SAMPLE_CHARS] + "…") if len(one) > SAMPLE_CHARS else (one or "(empty)")


class Weights(NamedTuple):
    """Where the build's model weights come from (the signatures of the hf_io / rewards loaders)."""

    causal_lm: Callable[..., Pretrained]  # (path, dtype) -> Pretrained
    reward_model: Callable[..., RewardModel]  # (path, dtype) -> RewardModel
    judge: Callable[..., LMJudge]  # (path, template, safe_id, unsafe_id, dtype, pad_id, read, read_tokens)


def _init_causal_lm(path, dtype) -> Pretrained:
    """`path`'s config.json with `llama.init_params` weights in place of its tensors (which are never
    opened: a config-only folder will do), or a GGUF's metadata. Meant to be traced (`jax.eval_shape`):
    nothing is allocated."""
    from alignjax.models import gguf_io

    gguf_file = gguf_io.gguf_file_of(path)
    if gguf_file is not None:  # a llama GGUF: its metadata (read_gguf_config checks every tensor's header)
        config = gguf_io.read_gguf_config(gguf_file)
        return Pretrained(llama.init_params(config, jax.random.PRNGKey(0), dtype), config)
    config, arch, _ = read_config(path)
    if arch not in CAUSAL_LM_ARCHITECTURES:
        raise CheckpointError(f"{path} holds a {arch}, not a causal LM")
    return Pretrained(llama.init_params(config, jax.random.PRNGKey(0), dtype), config)


def _init_reward_model(path, dtype) -> RewardModel:
    """A reward model of `path`'s config.json shapes (backbone + value head), weights initialised."""
    config, arch, _ = read_config(path)
    if arch not in SEQ_CLS_ARCHITECTURES:
        raise CheckpointError(f"{path} holds a {arch}; a reward model needs one of "
                              f"{sorted(SEQ_CLS_ARCHITECTURES)}")
    return RewardModel(heads.init_critic(config, jax.random.PRNGKey(0), None, dtype), config)


def _init_judge(path, template, safe_id, unsafe_id, dtype=jnp.float32, pad_id=None, read="next",
                read_tokens=1) -> LMJudge:
    """`load_lm_judge` with the judge's weights initialised from its config.json's shapes."""
    lm = _init_causal_lm(path, dtype)
    pad = pad_id if pad_id is not None else (lm.config.pad_token_id or 0)
    return LMJudge(lm.params, lm.config, template, int(safe_id), int(unsafe_id), int(pad), read,
                   int(read_tokens))


LOAD = Weights(load_pretrained, load_reward_model, load_lm_judge)  # read the checkpoints
ABSTRACT = Weights(_init_causal_lm, _init_reward_model, _init_judge)  # shapes only (under eval_shape)


def _player_states(cfg, d, a, dtype, weights: Weights = LOAD):
    """The players' PlayerStates: policies from the checkpoints, critics from a reward-model folder
    (`<player>.critic_checkpoint`) or the policy's backbone with a fresh value head."""
    k = keys.init_keys(cfg.seed)

    def state(player, pre, key):
        if player.critic_checkpoint:
            critic = weights.reward_model(player.critic_checkpoint, dtype).params
        else:
            # the head in the backbone's dtype: optax's injected hyperparameters take the params' common
            # dtype, and a bf16 backbone with an f32 head would turn the bf16 Adam moments into f32
            critic = heads.init_critic(pre.config, key, pre.params, dtype)
        return make_player_state(pre.params, critic, player.policy_optimizer, player.critic_optimizer)

    return state(cfg.defender, d, k.defender_critic), state(cfg.attacker, a, k.attacker_critic)


class RealContext(NamedTuple):
    tokenizer: Any  # the players' alignjax.text.Tokenizer
    benign: Any  # (tokens [M, S], mask [M, S]) of real.benign_prompts, or None


def encode_prompts(tok, lines: list[str], real: RealConfig, option: str, direct_limit: int,
                   content_prefix: str = ""):
    """(tokens [N, S], mask [N, S] left-padded, number cut) with S = real.max_prompt_tokens.

    A prompt over S tokens, or over `direct_limit` (the prompt block, game.attacker_sampling.
    max_new_tokens: a seed asked directly, in RLHF and in every evaluation, must fit it) is an error
    naming it (real.long_seeds=reject), or keeps its last tokens (truncate) and is counted."""
    ids = tok.encode_batch([content_prefix + ln for ln in lines])  # " " for byte-level BPE slots
    limit = min(real.max_prompt_tokens, direct_limit)
    long = [i for i, r in enumerate(ids) if len(r) > limit]
    if long and real.long_seeds == "reject":
        raise ValueError(
            f"{option}: {len(long)} of {len(lines)} prompts exceed {limit} tokens (real.max_prompt_tokens="
            f"{real.max_prompt_tokens}; asked directly a prompt must also fit the prompt block, "
            f"game.attacker_sampling.max_new_tokens={direct_limit}). First: prompt {long[0] + 1} in reading "
            f"order, {len(ids[long[0]])} tokens. Raise the limits, or set real.long_seeds=truncate to keep "
            "their last tokens (counted in results.md)")
    tokens, mask = tok.pad_batch(ids, max_len=real.max_prompt_tokens, side="left", truncation="left")
    return tokens, mask, len(long)


def check_context(cfg, spec: GameSpec, roles: dict) -> None:
    """Raise ConfigError where a player's longest sequence (its template, the widest content it is given
    and its new tokens) exceeds the context its checkpoint was trained for (max_position_embeddings):
    RoPE would run past it without an error and the model would read positions it never saw."""
    g = cfg.game
    content = {"attacker": cfg.real.max_prompt_tokens, "defender": spec.prompt_len}
    new = {"attacker": g.attacker_sampling.max_new_tokens, "defender": g.defender_sampling.max_new_tokens}
    for role, (tpl, config) in roles.items():
        longest = len(tpl.prefix) + len(tpl.suffix) + content[role] + new[role]
        if longest > config.max_position_embeddings:
            raise ConfigError(
                f"the {role}'s sequences reach {longest} tokens (template {len(tpl.prefix) + len(tpl.suffix)}"
                f" + content {content[role]} + {new[role]} new), over its checkpoint's context of "
                f"{config.max_position_embeddings} ({role}.checkpoint's max_position_embeddings): lower "
                f"real.max_prompt_tokens or game.*_sampling.max_new_tokens")


def read_seed_lines(path) -> list[str]:
    """Seed questions of a prompt file in any format `worlds.real_data.read_prompt_lines` reads (text,
    the authors' .json, a .csv; `package:` paths), in file order."""
    return read_prompt_lines(path, "prompts").texts


def check_judge_options(judge: JudgeConfig) -> None:
    """No option of the other kind set (it would be ignored), read_tokens only with first_answer."""
    default = JudgeConfig()
    other = REFUSAL_ONLY if judge.kind == "lm" else LM_ONLY
    bad = [f"real.judge.{k}={getattr(judge, k)!r}" for k in other if getattr(judge, k) != getattr(default, k)]
    if judge.kind == "lm" and judge.read != "first_answer" and judge.read_tokens != default.read_tokens:
        bad.append(f"real.judge.read_tokens={judge.read_tokens} (read with real.judge.read=first_answer "
                   "only)")
    if bad:
        raise ConfigError(f"real.judge.kind={judge.kind!r} has no use for {', '.join(bad)}: remove them "
                          "(or change real.judge.kind)")


class JudgeSetup(NamedTuple):
    """What `judge_setup` reads from the judge's tokenizer: all a kind-lm judge needs but its weights."""

    tokenizer: Any  # the judge's alignjax TextTokenizer
    template: JudgeTemplate
    safe_id: int
    unsafe_id: int
    pad_id: int


def judge_setup(judge: JudgeConfig) -> JudgeSetup:
    """Read the kind-lm judge's tokenizer (no weights) and check its config against it, raising
    ConfigError naming the option: the template (a preset, a text, or a file; one "{prompt}" before
    one "{response}", text after it) and the answer words (each exactly one token of the judge's
    tokenizer, the two different; a word that is not is shown with its ids and one-token variants).
    Cheap: it runs before anything loads (`check_judge`) and again in the build."""
    check_judge_options(judge)
    if judge.kind != "lm":
        raise ValueError(f"judge_setup is for real.judge.kind=lm, not {judge.kind!r}")
    tok = load_tokenizer(judge.checkpoint)
    try:
        text = template_text(judge.template, "real.judge.template")
        template = JudgeTemplate.from_text(tok.backend, text, bos_id=tok.bos_id if judge.bos else None)
    except ValueError as e:
        raise ConfigError(e if str(e).startswith("real.judge.template") else f"real.judge.template: {e}") \
            from None
    try:
        safe_id, unsafe_id = answer_token_ids(tok.backend, judge.safe, judge.unsafe, "real.judge")
    except ValueError as e:
        raise ConfigError(f"{e}\n(the judge's tokenizer: {judge.checkpoint})") from None
    return JudgeSetup(tok, template, safe_id, unsafe_id, tok.pad_id if tok.pad_id is not None else 0)


def check_judge(cfg) -> None:
    """`real.judge` against the judge's tokenizer, before anything loads (`judge_setup`; nothing to read
    for kind refusal). Call after the paths are checked."""
    if cfg.real.judge.kind == "lm":
        judge_setup(cfg.real.judge)
    else:
        check_judge_options(cfg.real.judge)


def judge_sentence(judge: JudgeConfig) -> str:
    """How the answers were judged, for results.md's first paragraph (the run notes give the details)."""
    if judge.kind == "refusal":
        return ("the refusal-pattern proxy (unsafe = the answer does not refuse; a string match, see the "
                "run notes)")
    return f"the LM judge (unsafe = P({judge.unsafe!r}) > P({judge.safe!r}); see the run notes)"


def _judge_and_referee(cfg, tok, dtype, weights: Weights = LOAD, setup: JudgeSetup | None = None,
                       eos_id: int | None = None):
    """(judge for the consts, referee(judge, x, xm, y, ym) -> Scores). Kind lm: the LM judge's pytree
    (its weights travel in the consts); kind refusal: None (the referee decodes the answers, cut at
    `eos_id`, and matches refusal phrases)."""
    jc, g = cfg.real.judge, cfg.game
    if jc.kind == "refusal":
        decode = lambda t, m: tok.decode_responses(t, m, eos_id)  # noqa: E731 (no special tokens)
        judge_fn = refusal_judge(decode, jc.refusal_window)
        return None, lambda _, *xy: scores_from_judge(judge_fn(*xy))
    s = setup or judge_setup(jc)
    judge = weights.judge(jc.checkpoint, s.template, s.safe_id, s.unsafe_id, dtype, pad_id=s.pad_id,
                          read=jc.read, read_tokens=jc.read_tokens if jc.read == "first_answer" else 1)
    judge_tok = s.tokenizer
    if judge_tok.backend.get_vocab() == tok.backend.get_vocab():
        return judge, lambda j, *xy: scores_from_judge(j(*xy))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    encode = lambda text: judge_tok.encode(text)  # noqa: E731
    # slots for the re-encoded texts: the judge runs on them padded, so not the (far longer) worst case
    k = jc.reencode_tokens
    plen, rlen = k * g.attacker_sampling.max_new_tokens, k * g.defender_sampling.max_new_tokens
    hint = (f"the judge's tokenizer splits the players' text finer than real.judge.reencode_tokens={k} judge "
            "tokens per player token; raise it (the judge then reads longer padded sequences)")

    def referee(j, *xy):
        tpl = s.template
        return scores_from_judge(retokenizing_judge(j, decode, encode, plen, rlen, j.pad_id,
                                                    tpl.prompt_prefix, tpl.response_prefix, hint)(*xy))

    return judge, referee


def _judge_note(judge: JudgeConfig, setup: JudgeSetup | None) -> str:
    """results.md's run note on the judge: which one, with its ids, or with the proxy's caveat."""
    if setup is None:
        return ("refusal-pattern proxy (real.judge.kind=refusal): an answer is unsafe when none of the "
                "refusal phrases of alignjax/eval/refusal.py (the GCG test prefixes) is in its first "
                f"{judge.refusal_window} characters. A proxy: it over-counts (any answer that does not "
                "refuse counts as an attack success, harmless or gibberish) and under-counts (an apology "
                "followed by compliance counts as safe); its ASR is the share of answers that did not refuse")
    template = judge.template if len(judge.template) <= 60 and "{" not in judge.template else "custom text"
    read = "the token after the template" if judge.read == "next" else \
        f"the first answer within {judge.read_tokens} greedy tokens"
    return (f"LM judge {judge.checkpoint}, template {template}, answers {judge.safe!r} (id "
            f"{setup.safe_id}) / {judge.unsafe!r} (id {setup.unsafe_id}) read at {read}")


# spec static (hashable, compared by value): the final evaluation reuses the initial one's executables
_play_jit = jax.jit(play, static_argnums=0)


SAMPLE_ROWS = 5  # (seed, rewrite, answer, verdict) rows kept per evaluation for results.md


def evaluate_real(built: Built, defender_params, attacker_params, key, n: int, batch_size: int = 0,
                  sample_rows: int = SAMPLE_ROWS) -> dict:
    """Attack success of the defender on the first n seed prompts (asked directly) and of the
    attacker's rewrites of them (one sampled answer each, judged), plus the rewrites' diversity and,
    with a benign set, the defender's over-refusal.

    Returns the rates (means over prompts), each with a 95% percentile-bootstrap interval over prompts
    (`<rate>_ci`, stats.bootstrap_ci), the per-prompt values behind them (`per_prompt`: judge P(unsafe)
    [n] per pass, refusal flags [m] on the benign set) and the first `sample_rows` attacker-pass rows as
    texts (`samples`: seed, rewrite, answer, P(unsafe)). Played in calls of `batch_size` rows
    (0 = the game's batch); the last call repeats its last prompt and drops those rows."""
    spec = built.spec
    spec = dataclasses.replace(spec, axis_name=None, cfg=dataclasses.replace(
        spec.cfg, batch_size=batch_size or spec.cfg.batch_size))
    direct = dataclasses.replace(spec, cfg=dataclasses.replace(
        spec.cfg, prompt_source="seeds", schedule=sched.ScheduleConfig(mode="defend_only")))
    state = built.state._replace(
        defender=built.state.defender.replace(policy_params=defender_params),
        attacker=built.state.attacker.replace(policy_params=attacker_params))
    n = min(n, built.consts.seed_tokens.shape[0])
    bsz, tok = spec.cfg.batch_size, built.context.tokenizer
    out = {"defender_asr": [], "attacker_asr": [], "prompts": [], "lengths": []}
    samples = []
    starts = range(0, n, bsz)
    bar = tqdm(total=2 * len(starts), desc="evaluation (seed prompts)", unit="batch", leave=False)
    for name, sp in (("defender_asr", direct), ("attacker_asr", spec)):
        fn = functools.partial(_play_jit, sp)
        for start in starts:
            idx = np.minimum(np.arange(start, start + bsz), n - 1)
            batch = (built.consts.seed_tokens[idx], built.consts.seed_mask[idx])
            ep = fn(state, batch, jax.random.fold_in(key, start), built.consts)
            k = min(bsz, n - start)
            unsafe = np.asarray(ep.scores.judge.unsafe, np.float32)[:k]
            out[name].append(unsafe)
            if name == "attacker_asr":
                out["prompts"].append(np.asarray(clean_prompts(ep, spec.pad_id))[:k])
                out["lengths"].append(np.asarray(ep.prompt_lengths)[:k])
                if len(samples) < sample_rows:
                    samples += _sample_rows(tok, spec, batch, ep, unsafe, sample_rows - len(samples))
            bar.update()
    bar.close()
    per_prompt = {"defender_attack_success": np.concatenate(out["defender_asr"]),
                  "attacker_attack_success": np.concatenate(out["attacker_asr"])}
    lengths = np.concatenate(out["lengths"])
    res = {"n": n}
    if n >= 2 and lengths.max() > 0:
        res["attacker_diversity"] = selfbleu_diversity(np.concatenate(out["prompts"]), lengths)
    if built.context.benign is not None:
        per_prompt["over_refusal"] = _refusals(built, direct, state, key)
        res["n_benign"] = len(per_prompt["over_refusal"])
    for rate, values in per_prompt.items():
        res[rate] = float(np.mean(values))
        res[f"{rate}_ci"] = list(stats.bootstrap_ci(values))
    res["per_prompt"] = {k: [float(v) for v in vs] for k, vs in per_prompt.items()}
    res["samples"] = samples
    return res


def _sample_rows(tok, spec: GameSpec, batch, ep, unsafe, k: int) -> list[dict]:
    """The first k rows of an attacker-pass episode as texts: seed, rewrite, answer, P(unsafe)."""
    k = min(k, len(unsafe))
    seeds = tok.decode_responses(np.asarray(batch[0])[:k], np.asarray(batch[1])[:k], spec.eos_id)
    rewrites = tok.decode_responses(np.asarray(ep.prompt)[:k], np.asarray(ep.prompt_mask)[:k], spec.eos_id)
    answers = tok.decode_responses(np.asarray(ep.response)[:k], np.asarray(ep.response_mask)[:k], spec.eos_id)
    return [{"seed": s, "rewrite": r, "answer": a, "p_unsafe": float(u)}
            for s, r, a, u in zip(seeds, rewrites, answers, unsafe[:k], strict=True)]


def _refusals(built: Built, direct: GameSpec, state, key) -> np.ndarray:
    """Per benign prompt [M], 1.0 where the defender's sampled answer (asked directly) is a refusal."""
    tokens, mask = built.context.benign
    m, bsz, texts = tokens.shape[0], direct.cfg.batch_size, []
    fn = functools.partial(_play_jit, direct)
    for start in tqdm(range(0, m, bsz), desc="evaluation (benign prompts)", unit="batch", leave=False):
        idx = np.minimum(np.arange(start, start + bsz), m - 1)
        ep = fn(state, (jnp.asarray(tokens[idx]), jnp.asarray(mask[idx])),
                jax.random.fold_in(key, 10**6 + start), built.consts)
        k = min(bsz, m - start)
        texts += built.context.tokenizer.decode_responses(np.asarray(ep.response)[:k],
                                                          np.asarray(ep.response_mask)[:k], direct.eos_id)
    return np.asarray([is_refusal(t) for t in texts], np.float32)
