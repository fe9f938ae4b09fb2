"""Generation throughput: alignjax's jitted sampler vs HF transformers PyTorch `generate`, same process,
same random weights, same sampling settings (T 0.8, top-p 0.9, repetition penalty 1.1, top-k off),
plus the memory-bandwidth floor of a decode step on this machine and where our decode step goes.

    python benchmarks/bench_generate.py                        # ~134M Llama, batch 8, 64 + 128 tokens
    ALIGNJAX_BENCH_SMALL=1 python benchmarks/bench_generate.py  # smoke run, a few seconds
    ALIGNJAX_BENCH_REPEATS=5 ...                                # timed calls per measurement (default 3)
    ALIGNJAX_BENCH_HF=0 ...                                     # skip HF (minutes on a loaded machine)

Every time printed is the median of the repeats. Our per-step decode time is
(t(N new tokens) - t(1 new token)) / (N - 1), which removes the prefill; the two calls alternate.

Floor: a decode step at batch 8 is memory-bound (perf-notes.md), so its time is at least
(bytes of weights read + bytes of live KV cache read) / bandwidth, with the bandwidth measured here
by a large NumPy copy (STREAM "copy": bytes read + bytes written over time).

Breakdown: the parts of one decode step, each with the sampler's own code and shapes (weights per
layer as the sampler holds them, cache filled to the mean decode length), each run in a jitted loop
as the sampler runs its steps, the parts timed alternately. "layers" is the whole transformer stack
(weight matmuls, cache write, attention); the attention and matmul rows are parts of it, shown with
their bytes and their own floor. "rest" is the sampler's step minus layers, LM head and sampling:
the loop, the bookkeeping (writing the token, updating the seen-token mask) and timing noise.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alignjax import sampling  # noqa: E402

try:
    from benchmarks import summary  # noqa: E402
except ImportError:  # run as a script, python benchmarks/<this file>
    import summary  # noqa: E402
from alignjax.models import LMConfig, init_params, llama, save_pretrained  # noqa: E402
from alignjax.sampling import SamplingConfig, sample  # noqa: E402

SMALL = os.environ.get("ALIGNJAX_BENCH_SMALL", "") not in ("", "0")
RUN_HF = os.environ.get("ALIGNJAX_BENCH_HF", "1") not in ("", "0")


def copy_bandwidth(nbytes: int = 2**29, repeats: int = 5) -> float:
    """Median bytes/s of np.copyto between two nbytes buffers, counting read + write."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / float(np.median(times))


def timed(fns: dict, repeats: int) -> dict:
    """Median wall time of each fn over `repeats` rounds; the fns alternate within a round so that a
    change of machine load hits all of them alike (each must block until its result is ready)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def hf_reference(write_folder, threads: int):
    """HF's float32 LlamaForCausalLM of the weights `write_folder(folder)` writes as an HF folder, with
    torch on `threads` threads (printed with the versions): the reference of the generation benchmarks."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    print(f"torch {torch.__version__} with {threads} threads; transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as d:
        write_folder(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def time_hf_generate(hf, prompt: np.ndarray, mask: np.ndarray, cfg: SamplingConfig, repeats: int) -> float:
    """Median seconds of HF `generate` writing cfg.max_new_tokens tokens for every row of prompt [B, P]
    (left-padded by mask), with our sampling settings (temperature, top-p, repetition penalty; top-k
    off) and no EOS stop, as `sample(..., eos_id=None)` runs. One warm-up call first."""
    import torch

    hf.generation_config.eos_token_id = None  # all max_new_tokens tokens, as ours with eos_id=None
    ids, att = torch.tensor(prompt, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def generate(n):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=att, do_sample=True, max_new_tokens=n,
                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                              repetition_penalty=cfg.repetition_penalty, pad_token_id=0)
        assert out.shape == (prompt.shape[0], prompt.shape[1] + n), out.shape

    generate(2)  # warm-up (allocator, thread pool)
    return timed({"hf": lambda: generate(cfg.max_new_tokens)}, repeats)["hf"]


def decode_parts(params, config, batch, cache_len, fill, cfg, repeats, steps=16):
    """Median seconds of each part of one decode step (module docstring), the cache holding `fill` tokens.

    Each part runs `steps` times in one jitted `fori_loop`, each iteration fed by the last one's result,
    as in the sampler's while loop (no per-call dispatch, nothing hoisted out of the loop)."""
    layered = llama.unstack_layers(params)  # as the sampler holds them
    cache = llama.init_cache(config, batch, cache_len)
    rnd = lambda i, x: 0.1 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
    cache = cache._replace(
        k=tuple(rnd(i, x) for i, x in enumerate(cache.k)),
        v=tuple(rnd(100 + i, x) for i, x in enumerate(cache.v)),
        valid=jnp.arange(cache_len)[None, :].repeat(batch, 0) < fill,
        index=jnp.asarray(fill, jnp.int32),
    )
    pos = jnp.full((batch, 1), fill, jnp.int32)

    def layers(params, carry):  # the whole stack; the cache is carried and written in place
        tok, cache = carry
        h, cache = llama.hidden_states(params, config, tok, positions=pos, cache=cache)
        return (h[:, :, 0] > 0).astype(jnp.int32), cache._replace(index=cache.index - 1)  # same slot again

    def attention(cache, q):  # every layer's attention over its cache buffers (the empty slots too)
        for k, v in zip(cache.k, cache.v, strict=True):
            q = llama.attention(q, k, v, cache.valid[:, None, :])
        return q

    def matmuls(layer_params, x):  # every weight matrix of the stack applied to [B, D]
        for lp in layer_params:
            k, v = x @ lp["wk"], x @ lp["wv"]  # folded in so they are not dead code
            x = x + (x @ lp["wq"]) @ lp["wo"] + jnp.sum(k + v, axis=-1, keepdims=True)
            x = x + (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]
        return x

    def lm_head(params, x):
        return x + 1e-6 * llama.lm_logits(params, config, x)[:, : x.shape[1]]

    def choose(seen, carry):  # the logits processing and the draw
        logits, key = carry
        key, sub = jax.random.split(key)
        token, _, _ = sampling._choose(logits, seen, sub, cfg)
        return logits + 1e-6 * token[:, None], key

    def looped(part, const, carry):
        run = jax.jit(
            lambda const, carry: jax.lax.fori_loop(0, steps, lambda _, c: part(const, c), carry),
            donate_argnums=1,
        )
        state = {"carry": carry}

        def call():
            state["carry"] = run(const, state["carry"])
            jax.block_until_ready(state["carry"])

        call()  # compile
        return call

    x = lambda: jnp.ones((batch, config.hidden_size), jnp.float32)  # a fresh carry per loop (donated)
    logits = 3.0 * jax.random.normal(jax.random.key(7), (batch, config.vocab_size))
    seen = jax.random.bernoulli(jax.random.key(8), 0.01, (batch, config.vocab_size))
    q = jnp.ones((batch, 1, config.num_heads, config.head_dim), jnp.float32)
    read_only_cache = jax.tree.map(jnp.copy, cache)  # `cache` itself is donated to the layers' loop
    fns = {
        "layers": looped(layers, layered, (jnp.ones((batch, 1), jnp.int32), cache)),
        "attention": looped(attention, read_only_cache, q),
        "matmuls": looped(matmuls, layered["layers"], x()),
        "lm_head": looped(lm_head, params, x()),
        "sampling": looped(choose, seen, (logits, jax.random.key(0))),
    }
    return {name: t / steps for name, t in timed(fns, repeats).items()}


def main():
    threads = os.cpu_count() or 1
    if SMALL:
        config = LMConfig(
            vocab_size=4000,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=512,
        )
        batch, prompt_len, new, repeats = 2, 16, 16, 1
    else:
        config = LMConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_layers=12,
            num_heads=12,
            num_kv_heads=12,
            max_position_embeddings=2048,
        )
        batch, prompt_len, new, repeats = 8, 64, 128, 3
    repeats = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", repeats))
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {threads} cores; "
        f"load average {os.getloadavg()[0]:.1f} at start; medians of {repeats} repeats"
    )
    print(
        f"model: {config.num_params / 1e6:.1f}M params (L={config.num_layers}, d={config.hidden_size}, "
        f"V={config.vocab_size}), fp32; batch {batch}, prompt {prompt_len}, {new} new tokens; "
        f"T={cfg.temperature} top-p={cfg.top_p} repetition={cfg.repetition_penalty} top-k off; no EOS stop"
    )

    params = init_params(config, jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompt)
    tok = batch * new

    # ----- HF: the same weights through an exported HF folder
    t_hf = None
    if RUN_HF:
        hf = hf_reference(lambda d: save_pretrained(params, config, d), threads)
        t_hf = time_hf_generate(hf, prompt, mask, cfg, repeats)

    # ----- ours: compile excluded (a warm-up call per shape), params already on device
    prompt_j, mask_j = jnp.asarray(prompt), jnp.asarray(mask)

    def ours(n):
        c = SamplingConfig(n, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
        out = sample(params, config, prompt_j, mask_j, jax.random.key(1), c, None, 0)
        jax.block_until_ready(out)
        assert int(out.mask.sum()) == batch * n

    t_compile = time.perf_counter()
    ours(new)
    t_compile = time.perf_counter() - t_compile
    ours(1)
    t = timed({"n": lambda: ours(new), "1": lambda: ours(1)}, repeats)
    t_ours, t_prefill = t["n"], t["1"]
    step_ours = (t_ours - t_prefill) / (new - 1)

    # ----- floor, and the parts of a decode step
    mean_live = prompt_len + new // 2  # live cache slots averaged over the decode steps
    cache_len = prompt_len + new - 1  # the sampler's cache
    parts = decode_parts(params, config, batch, cache_len, mean_live, cfg, repeats=max(repeats, 5))
    bw = copy_bandwidth(2**26 if SMALL else 2**29)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    layer_bytes = nbytes(params["layers"])
    head_bytes = nbytes(params["embed"] if config.tie_word_embeddings else params["lm_head"])
    weight_bytes = layer_bytes + head_bytes + nbytes(params["final_norm"])
    kv_per_slot = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * 4
    step_bytes = weight_bytes + kv_per_slot * mean_live
    step_floor = step_bytes / bw

    if t_hf is not None:
        print(f"HF transformers generate : {t_hf:7.2f} s  {tok / t_hf:8.1f} tokens/s")
    print(
        f"alignjax sample (jit)    : {t_ours:7.2f} s  {tok / t_ours:8.1f} tokens/s   "
        f"(compile excluded: first call incl. compile took {t_compile:.1f} s)"
    )
    if t_hf is not None:
        print(f"speed-up ours / HF       : {t_hf / t_ours:7.2f} x   (target >= 2)")
        summary.record("generate_hf_tok_s", round(tok / t_hf, 2))
        summary.record("generate_speedup_vs_hf", round(t_hf / t_ours, 3))
    summary.record("generate_tok_s", round(tok / t_ours, 2))
    print(f"memory copy bandwidth    : {bw / 1e9:7.1f} GB/s (np.copyto, read + write)")
    print(
        f"bytes per decode step    : {weight_bytes / 1e6:.0f} MB weights + "
        f"{kv_per_slot * mean_live / 1e6:.0f} MB KV cache (mean over steps) = {step_bytes / 1e6:.0f} MB"
    )
    print(
        f"decode step: ours {step_ours * 1e3:.1f} ms, floor {step_floor * 1e3:.1f} ms -> "
        f"{step_ours / step_floor:.2f} x the floor (target <= 2); "
        f"prefill + first token {t_prefill * 1e3:.0f} ms"
    )
    summary.record("decode_step_over_floor", round(step_ours / step_floor, 3))
    summary.record("decode_step_ms", round(step_ours * 1e3, 2))
    summary.record("decode_floor_ms", round(step_floor * 1e3, 2))

    ms = lambda s: f"{s * 1e3:7.1f} ms"
    rest = step_ours - parts["layers"] - parts["lm_head"] - parts["sampling"]
    rows = [
        ("layers (whole stack)", parts["layers"], layer_bytes + kv_per_slot * cache_len),
        ("  of which attention", parts["attention"], kv_per_slot * cache_len),
        ("  of which weight matmuls", parts["matmuls"], layer_bytes),
        ("lm_head [B,D]x[D,V]", parts["lm_head"], head_bytes),
        ("sampling (_choose)", parts["sampling"], None),
        ("rest (loop, bookkeeping)", rest, None),
    ]
    print(
        f"decode step, part by part (each in its own jitted loop; cache at {mean_live} of {cache_len} slots; "
        f"attention reads all {cache_len}):"
    )
    print(f"  {'part':28s} {'time':>10s} {'MB read':>9s} {'floor':>10s}")
    for name, s, b in rows:
        extra = f" {b / 1e6:9.0f} {ms(b / bw)}" if b is not None else ""
        print(f"  {name:28s} {ms(s)}{extra}")
    print(f"  {'step (from the sampler)':28s} {ms(step_ours)} {step_bytes / 1e6:9.0f} {ms(step_floor)}")
    print(
        f"end to end: floor {tok / (t_prefill + (new - 1) * step_floor):.1f} tokens/s with our prefill, "
        f"ours {tok / t_ours:.1f} tokens/s; load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
