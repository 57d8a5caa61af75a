"""Test session set-up: 8 fake CPU devices, so sharded code is tested on CPU.

This runs before any test module imports jax computations; the device count
cannot change once the backend is initialised.
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
# Compilation dominates test time on a small CPU machine; tests that compile
# the same programs (tiny towers, train steps) share them through this cache.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "HICA_TEST_COMPILATION_CACHE", "/tmp/hica_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
