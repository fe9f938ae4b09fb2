"""The sampler against independent references: HF `generate` (greedy, token for token), HF's logits
processors (repetition penalty, top-k, top-p), a brute-force nucleus definition with ties, a NumPy
teacher-forced recomputation of every log-probability, and a chi-square test of sampled frequencies
against the filtered softmax computed in NumPy from HF logits."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from alignjax.models import load_pretrained
from alignjax.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    sample,
    sampling_distribution,
    top_k_mask,
    top_p_mask,
)
from tests.hf_fixtures import hf_logits, load_hf_model, make_tiny_hf_checkpoint, random_left_padded

PAD = 0


# ----------------------------------------------------------------------------- NumPy reference


def np_sampling_logprobs(logits, seen_ids, cfg: SamplingConfig):
    """Sort-based NumPy reference of the sampling distribution (float64): log q [V] (-inf = dropped)."""
    s = np.asarray(logits, np.float64).copy()
    if cfg.repetition_penalty != 1.0:
        idx = np.array(sorted(set(int(i) for i in seen_ids)), dtype=int)
        s[idx] = np.where(s[idx] < 0, s[idx] * cfg.repetition_penalty, s[idx] / cfg.repetition_penalty)
    if cfg.greedy:
        return s - np.logaddexp.reduce(s)
    s = s / cfg.temperature
    if cfg.top_k > 0:
        kth = np.sort(s)[::-1][min(cfg.top_k, s.size) - 1]
        s = np.where(s >= kth, s, -np.inf)
    if cfg.top_p < 1.0:
        p = np.exp(s - np.logaddexp.reduce(s))
        order = np.argsort(-p, kind="stable")
        excl = np.cumsum(p[order]) - p[order]  # mass before each token in descending order
        kept = np.zeros(p.size, bool)
        kept[order[excl < cfg.top_p]] = True
        s = np.where(kept, s, -np.inf)
    return s - np.logaddexp.reduce(s)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x)


def check_sample_output(out, b, n):
    """SampleOutput as documented: tokens [B, N] int32, logprobs / policy_logprobs [B, N] float32
    (finite), mask [B, N] int32."""
    chex.assert_shape([out.tokens, out.logprobs, out.mask, out.policy_logprobs], (b, n))
    chex.assert_type([out.tokens, out.mask], jnp.int32)
    chex.assert_type([out.logprobs, out.policy_logprobs], jnp.float32)
    chex.assert_tree_all_finite([out.logprobs, out.policy_logprobs])


def check_eos_layout(tokens, mask, eos_ids, n):
    """mask is 1 up to and including the first EOS, 0 after; tokens after it are PAD."""
    for b in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[b], eos_ids))
        stop = hits[0] + 1 if hits.size else n
        np.testing.assert_array_equal(mask[b, :stop], 1)
        np.testing.assert_array_equal(mask[b, stop:], 0)
        np.testing.assert_array_equal(tokens[b, stop:], PAD)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("sampling"), family="llama", seed=3)


# ----------------------------------------------------------------------------- logits processors vs HF


def test_repetition_penalty_and_top_k_match_hf():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    logits[:, :3] = 0.0  # zero logits: HF divides them (l < 0 is false), same value either way
    ids = rng.integers(0, 50, size=(4, 7))
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
    penalized = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)
    chex.assert_shape(penalized, logits.shape)
    ours = np.asarray(penalized)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)

    tied = np.round(logits * 2) / 2  # many ties, including at the k-th value
    for k in (1, 5, 13, 50, 80):
        ref = np.isfinite(TopKLogitsWarper(k)(None, torch.tensor(tied)).numpy())
        keep = top_k_mask(jnp.asarray(tied), k)
        chex.assert_shape(keep, tied.shape)
        np.testing.assert_array_equal(np.asarray(keep), ref)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_hf_sort_based_warper(top_p):
    rng = np.random.default_rng(1)
    for scale in (0.1, 1.0, 4.0):  # near-uniform (most tokens kept) to peaked (one or two kept)
        logits = (scale * rng.normal(size=(6, 3000))).astype(np.float32)
        ref = np.isfinite(TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy())
        probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
        keep = top_p_mask(probs, top_p)
        chex.assert_shape(keep, logits.shape)
        np.testing.assert_array_equal(np.asarray(keep), ref)


def test_top_p_ties_at_boundary_brute_force():
    """Kept iff the mass strictly above the token is < top_p (brute force over pairs, float64):
    a tie group at the boundary is kept or dropped as a whole."""
    rng = np.random.default_rng(2)
    logits = rng.integers(0, 4, size=(60, 40)).astype(np.float32)  # 4 distinct values: many ties
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    p64 = probs.astype(np.float64)
    above = (p64[:, None, :] * (p64[:, None, :] > p64[:, :, None])).sum(-1)  # [B, i]: mass above p_i
    for top_p in (0.1, 0.35, 0.6, 0.95):
        decidable = np.all(np.abs(above - top_p) > 1e-5, axis=-1)  # float32 cannot decide closer calls
        assert decidable.sum() > 40
        ours = np.asarray(top_p_mask(jnp.asarray(probs), top_p))
        np.testing.assert_array_equal(ours[decidable], (above < top_p)[decidable])
        assert np.any(ours.sum(-1) > 1)
    # A designed case: values [3, 2, 2, 2, 1]; the head of 3 has mass < top_p, the tie group of 2s
    # straddles it, so the whole group is kept, the 1 dropped.
    p = np.array([[0.3, 0.2, 0.2, 0.2, 0.1]], np.float32)
    np.testing.assert_array_equal(np.asarray(top_p_mask(jnp.asarray(p), 0.45)), [[1, 1, 1, 1, 0]])


# ----------------------------------------------------------------------------- greedy vs HF generate


def hf_generate(model, tokens, mask, n, eos, **kw):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
            top_k=None,
            top_p=None,
            temperature=None,
            **kw,
        )
    return out[:, tokens.shape[1] :].numpy()


@pytest.mark.parametrize(
    "family,options,penalties",
    [("llama", {}, (1.0, 1.3)), ("qwen2", {"tie_word_embeddings": True}, (1.3,))],
)
def test_greedy_equals_hf_generate(tmp_path, family, options, penalties):
    path = make_tiny_hf_checkpoint(tmp_path, family=family, seed=5, **options)
    hf, ours = load_hf_model(path), load_pretrained(path)
    tokens, mask = random_left_padded(np.random.default_rng(3), 4, 9, 1000, min_len=2)
    n = 16
    greedy = SamplingConfig(max_new_tokens=n, greedy=True)
    # EOS := a token HF emits mid-sequence in row 1, so at least that row stops early.
    free = hf_generate(hf, tokens, mask, n, eos=None)
    eos = int(free[1, 5])
    for penalty in penalties:
        ref = hf_generate(hf, tokens, mask, n, eos=eos, repetition_penalty=penalty)
        out = sample(
            ours.params,
            ours.config,
            tokens,
            mask,
            jax.random.key(0),
            dataclasses.replace(greedy, repetition_penalty=penalty),
            eos,
            PAD,
        )
        check_sample_output(out, tokens.shape[0], n)
        got = np.asarray(out.tokens)
        np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)  # HF pads finished rows too
        np.testing.assert_array_equal(got[:, ref.shape[1] :], PAD)  # HF stops when all rows end
        assert ref.shape[1] < n or np.any(ref == eos)
        check_eos_layout(got, np.asarray(out.mask), [eos], n)
        assert np.any(np.asarray(out.mask)[1] == 0)


# ----------------------------------------------------------------------------- sampled log-probs


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, repetition_penalty=1.1),
        SamplingConfig(max_new_tokens=10, temperature=1.3, top_k=7, top_p=0.8),
        SamplingConfig(max_new_tokens=10, repetition_penalty=1.5, greedy=True),
    ],
    ids=["paper", "topk_topp", "greedy"],
)
def test_logprobs_equal_numpy_teacher_forced(llama_ckpt, cfg):
    """Every generated token's logprob (sampling distribution) and policy logprob (raw model) equal
    a NumPy recomputation from HF logits of the unpadded prompt + the tokens generated so far."""
    hf, ours = load_hf_model(llama_ckpt), load_pretrained(llama_ckpt)
    tokens, mask = random_left_padded(np.random.default_rng(4), 5, 7, 1000, min_len=1)
    eos = (2, 17)
    out = sample(ours.params, ours.config, tokens, mask, jax.random.key(7), cfg, eos, PAD)
    check_sample_output(out, tokens.shape[0], cfg.max_new_tokens)
    got, got_mask = np.asarray(out.tokens), np.asarray(out.mask)
    check_eos_layout(got, got_mask, list(eos), cfg.max_new_tokens)
    for b in range(tokens.shape[0]):
        prompt = tokens[b][mask[b] == 1]
        m = int(got_mask[b].sum())
        seq = np.concatenate([prompt, got[b, :m]])
        logits = hf_logits(hf, seq[None])[0]  # [len, V]
        for t in range(m):
            step = logits[len(prompt) + t - 1]
            ref = np_sampling_logprobs(step, seq[: len(prompt) + t], cfg)
            assert np.isfinite(ref[got[b, t]]), "sampled a token the reference drops"
            np.testing.assert_allclose(out.logprobs[b, t], ref[got[b, t]], atol=2e-4)
            np.testing.assert_allclose(out.policy_logprobs[b, t], np_log_softmax(step)[got[b, t]], atol=2e-4)
            if cfg.greedy:
                assert got[b, t] == np.argmax(ref)
        np.testing.assert_array_equal(np.asarray(out.logprobs)[b, m:], 0.0)


# ----------------------------------------------------------------------------- sampled frequencies


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=1, temperature=0.8, top_p=0.9, repetition_penalty=1.1),
        SamplingConfig(max_new_tokens=1, temperature=1.5, top_k=6),
        SamplingConfig(max_new_tokens=1, top_k=10, top_p=0.6, repetition_penalty=2.0),
    ],
    ids=["paper", "topk", "topk_topp"],
)
def test_sampled_frequencies_match_filtered_softmax(tmp_path, cfg):
    """Chi-square goodness of fit of 20k first-token draws (two prompts x 10k rows) against the NumPy
    filtered softmax of HF's logits; dropped tokens must never be drawn."""
    path = make_tiny_hf_checkpoint(
        tmp_path,
        family="llama",
        seed=1,
        vocab_size=24,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        std=0.2,
    )
    hf, ours = load_hf_model(path), load_pretrained(path)
    prompts = np.array([[0, 5, 9, 5], [7, 3, 11, 20]], np.int32)
    masks = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    reps = 10_000
    out = sample(
        ours.params,
        ours.config,
        np.repeat(prompts, reps, 0),
        np.repeat(masks, reps, 0),
        jax.random.key(11),
        cfg,
        None,
        PAD,
    )
    check_sample_output(out, 2 * reps, 1)
    draws = np.asarray(out.tokens)[:, 0].reshape(2, reps)
    for i in range(2):
        prompt = prompts[i][masks[i] == 1]
        step = hf_logits(hf, prompt[None])[0, -1]
        q = np.exp(np_sampling_logprobs(step, prompt, cfg))
        seen = np.zeros((1, q.size), bool)
        seen[0, prompt] = True
        logq = sampling_distribution(jnp.asarray(step[None], jnp.float32), seen, cfg)
        chex.assert_shape(logq, (1, q.size))
        dist = np.exp(np.asarray(logq))[0]
        np.testing.assert_allclose(dist, q, atol=1e-5)
        counts = np.bincount(draws[i], minlength=q.size)
        assert counts[q == 0].sum() == 0
        support = q > 0
        assert support.sum() >= 2, "test would be vacuous"
        _, pvalue = stats.chisquare(counts[support], reps * q[support] / q[support].sum())
        assert pvalue > 1e-3, (cfg, counts, q)


def test_config_validation():
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
    ):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_bad_prompts_raise_clear_errors(llama_ckpt):
    m = load_pretrained(llama_ckpt)
    cfg = SamplingConfig(max_new_tokens=2)
    tokens = np.full((2, 4), 5, np.int32)
    for mask, match in (
        (np.array([[1, 1, 0, 0], [1, 1, 1, 1]]), "left-padded"),
        (np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), "at least one real token"),
        (np.array([[0, 1, 0, 1], [1, 1, 1, 1]]), "left-padded"),
    ):
        with pytest.raises(ValueError, match=match):
            sample(m.params, m.config, tokens, mask, jax.random.key(0), cfg, 2, PAD)
    with pytest.raises(TypeError, match="eos_id"):
        sample(m.params, m.config, tokens, np.ones_like(tokens), jax.random.key(0), cfg, "</s>", PAD)


# ----------------------------------------------------------------------------- compiled decode loop


def _hlo_computations(text):
    """{name: [instruction lines]} of an HLO module's text; the entry computation is named "ENTRY"."""
    comps, name = {}, None
    for line in text.splitlines():
        if line.startswith("ENTRY"):
            name = "ENTRY"
        elif line.startswith("%") and line.rstrip().endswith("{"):
            name = line.split()[0].lstrip("%")
        else:
            if name is not None and " = " in line:
                comps[name].append(line.strip())
            continue
        comps[name] = []
    return comps


def test_decode_loop_copies_no_cache_or_weights():
    """Performance guard on the compiled sampler: in the decode loop's body, no instruction produces a
    buffer shaped like a layer's KV cache or a weight matrix except the in-place cache write. A copy,
    transpose or slice of the cache or the weights there costs each decode step (see llama.KVCache)."""
    from alignjax.models import LMConfig, init_params
    from alignjax.sampling import _eos_tuple, _sample

    # Distinct sizes so that a shape identifies the buffer: B 3, S = P + N - 1 = 12, hd 16, D 48, F 80.
    config = LMConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=3,
        num_kv_heads=3,
        max_position_embeddings=64,
    )
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    prompt = jax.ShapeDtypeStruct((3, 5), jnp.int32)
    lowered = _sample.lower(params, config, prompt, prompt, jax.random.key(0), cfg, _eos_tuple(None), 0,
                            jnp.int32(0), None)
    comps = _hlo_computations(lowered.compile().as_text())
    # The decode loop is the while of the entry computation with the largest body (the prefill is inline).
    bodies = [line.split("body=%")[1].split(",")[0] for line in comps["ENTRY"] if " while(" in line]
    assert bodies, "no while loop in the compiled sampler"
    body = max(bodies, key=lambda n: len(comps[n]))
    # Its instructions, and those of loops and calls nested in it (fusions' insides are not buffers).
    todo, lines = [body], []
    while todo:
        lines += comps[name := todo.pop()]
        for line in comps[name]:
            todo += (
                re.findall(r"(?:body|to_apply)=%([\w.-]+)", line)
                if re.search(r" (while|call)\(", line)
                else []
            )
    cache_shape = f"f32[3,{config.num_kv_heads},12,{config.head_dim}]"
    weight_shapes = {"f32[48,48]", "f32[48,80]", "f32[80,48]"}
    offenders = []
    for line in lines:
        m = re.search(r" = (\w+\[[\d,]*\])(?:\{[^}]*\})? ([\w-]+)\(", line)  # array-shaped results only
        if m is None or m[2] in ("parameter", "get-tuple-element", "bitcast"):
            continue
        shape, op = m[1], m[2]
        called = line.split("calls=%")[1].split(",")[0] if "calls=%" in line else None
        in_place_write = op == "dynamic-update-slice" or (
            called is not None and any(" dynamic-update-slice(" in x for x in comps[called])
        )
        if shape in weight_shapes or (shape == cache_shape and not in_place_write):
            offenders.append(line[:160])
    assert not offenders, "cache- or weight-sized buffers made in the decode loop:\n" + "\n".join(offenders)
