"""Generation throughput: alignjax's jitted sampler vs HF transformers PyTorch `generate`, same process,
same random weights, same sampling settings (T 0.8, top-p 0.9, repetition penalty 1.1, top-k off),
plus the memory-bandwidth floor of a decode step on this machine.

    python benchmarks/bench_generate.py                        # ~134M Llama, batch 8, 64 + 128 tokens
    ALIGNJAX_BENCH_SMALL=1 python benchmarks/bench_generate.py  # smoke run, a few seconds
    ALIGNJAX_BENCH_REPEATS=1 ...                                # one timed call each (default 2)

Floor: a decode step at batch 8 is memory-bound (perf-notes.md), so its time is at least
(bytes of weights read + bytes of live KV cache read) / bandwidth, with the bandwidth measured here
by a large NumPy copy (STREAM "copy": bytes read + bytes written over time). Our per-step decode time
is (t(N new tokens) - t(1 new token)) / (N - 1), which removes the prefill.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alignjax.models import LMConfig, init_params, save_pretrained  # noqa: E402
from alignjax.sampling import SamplingConfig, sample  # noqa: E402

SMALL = os.environ.get("ALIGNJAX_BENCH_SMALL", "") not in ("", "0")


def copy_bandwidth(nbytes: int = 2**29, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of np.copyto between two nbytes buffers, counting read + write."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (fn must block until its result is ready)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    import torch
    import transformers

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if SMALL:
        config = LMConfig(vocab_size=4000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=4, max_position_embeddings=512)
        batch, prompt_len, new, repeats = 2, 16, 16, 1
    else:
        config = LMConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                          num_heads=12, num_kv_heads=12, max_position_embeddings=2048)
        batch, prompt_len, new, repeats = 8, 64, 128, 2
    repeats = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", repeats))  # best of `repeats` timed calls
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with {threads} "
          f"threads; transformers {transformers.__version__}")
    print(f"model: {config.num_params / 1e6:.1f}M params (L={config.num_layers}, d={config.hidden_size}, "
          f"V={config.vocab_size}), fp32; batch {batch}, prompt {prompt_len}, {new} new tokens; "
          f"T={cfg.temperature} top-p={cfg.top_p} repetition={cfg.repetition_penalty} top-k off; no EOS stop")

    params = init_params(config, jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompt)

    # ----- HF: the same weights through an exported HF folder
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(params, config, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate all `new` tokens, as ours does with eos_id=None
    ids, att = torch.tensor(prompt, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def hf_generate(n):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=att, do_sample=True, max_new_tokens=n,
                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                              repetition_penalty=cfg.repetition_penalty, pad_token_id=0)
        assert out.shape == (batch, prompt_len + n), out.shape

    hf_generate(2)  # warm-up (allocator, thread pool)
    t_hf = timed(lambda: hf_generate(new), repeats)

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
    t_ours = timed(lambda: ours(new), repeats)
    t_prefill = timed(lambda: ours(1), repeats)
    step_ours = (t_ours - t_prefill) / (new - 1)

    # ----- floor. Also time a pure weight-streaming probe in XLA (every weight matrix of a decode step
    # applied to a [B, D] activation, no attention, no sampling): what this machine delivers right now,
    # which tells a loaded machine apart from a slow sampler.
    @jax.jit
    def weight_probe(params, x):
        def layer(h, lp):
            k, v = h @ lp["wk"], h @ lp["wv"]  # [B, Hkv*hd]: folded in so they are not dead code
            h = h + (h @ lp["wq"]) @ lp["wo"] + jnp.sum(k + v, axis=-1, keepdims=True)
            return h + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"], None

        h, _ = jax.lax.scan(layer, x, params["layers"])
        return h @ (params["embed"].T if config.tie_word_embeddings else params["lm_head"])

    x0 = jnp.ones((batch, config.hidden_size), jnp.float32)
    jax.block_until_ready(weight_probe(params, x0))
    t_probe = timed(lambda: jax.block_until_ready(weight_probe(params, x0)), 5)
    bw = copy_bandwidth(2**26 if SMALL else 2**29)
    leaves = jax.tree_util.tree_leaves({k: v for k, v in params.items() if k != "embed"})
    weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves) + batch * config.hidden_size * 4
    if config.tie_word_embeddings:
        weight_bytes += params["embed"].size * 4
    kv_per_slot = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * 4
    mean_live = prompt_len + new / 2  # live cache slots averaged over the decode steps
    step_bytes = weight_bytes + kv_per_slot * mean_live
    step_floor = step_bytes / bw

    tok = batch * new
    print(f"HF transformers generate : {t_hf:7.2f} s  {tok / t_hf:8.1f} tokens/s")
    print(f"alignjax sample (jit)    : {t_ours:7.2f} s  {tok / t_ours:8.1f} tokens/s   "
          f"(compile excluded: first call incl. compile took {t_compile:.1f} s)")
    print(f"speed-up ours / HF       : {t_hf / t_ours:7.2f} x   (target >= 2)")
    print(f"memory copy bandwidth    : {bw / 1e9:7.1f} GB/s (np.copyto, read + write)")
    print(f"bytes per decode step    : {weight_bytes / 1e6:.0f} MB weights + "
          f"{kv_per_slot * mean_live / 1e6:.0f} MB KV cache (mean over steps) = {step_bytes / 1e6:.0f} MB")
    print(f"decode step: ours {step_ours * 1e3:.1f} ms, floor {step_floor * 1e3:.1f} ms -> "
          f"{step_ours / step_floor:.2f} x the floor (target <= 2); "
          f"prefill + first token {t_prefill * 1e3:.0f} ms")
    print(f"XLA weight-streaming probe (matmuls of one decode step only): {t_probe * 1e3:.1f} ms "
          f"({weight_bytes / t_probe / 1e9:.1f} GB/s); ours / probe = {step_ours / t_probe:.2f} x")
    print(f"end to end: floor {tok / (t_prefill + (new - 1) * step_floor):.1f} tokens/s with our prefill, "
          f"ours {tok / t_ours:.1f} tokens/s")


if __name__ == "__main__":
    main()
