"""Test session setup: 8 fake CPU devices (pmap tests), CPU platform, float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per pytest-xdist worker: two workers already fill the 2 cores, and oversubscribed
# torch threads made tiny HF reference models orders of magnitude slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The synthetic world's SFT'd players are cached on disk, keyed by world config and numerics settings.
# Players built under the test settings differed in the last bits from those `make experiment` builds
# (over-refusal 0.013 vs 0.006 in the default run); the tests keep their own cache folder as well.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("ALIGNJAX_CACHE_DIR", os.path.join(_REPO, "cache", "tests"))
# XLA's persistent compilation cache: many tests compile the same programs (a run and its repeat, the
# seeds of a study, the CLI subprocesses, which inherit these variables). A hit loads the executable
# the first compilation wrote, so the numbers are those of a fresh compile; it halves the suite's time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, "cache", "tests", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
