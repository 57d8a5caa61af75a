"""Test session set-up: 8 fake CPU devices, so sharded code is tested on CPU.

This runs before any test module imports jax computations; the device count
cannot change once the backend is initialised.
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
