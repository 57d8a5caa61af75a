r"""Dense matmul rate per dtype on CPU: XLA:CPU (jitted jnp.dot) and torch.

  taskset -c 0 python bench/matmul_dtypes.py        # one core
  python bench/matmul_dtypes.py --sizes 1024,2048 --dtypes float32,bfloat16

Rate = 2 n^3 / process CPU seconds of one n x n x n matmul, median of
`--repeats` after one untimed call; torch runs with one thread per usable
core. Under `taskset -c 0` (one thread each, nothing spins) the CPU seconds
do not depend on other processes' load. It says whether the train-step
comparison with PyTorch (f32, BENCHMARKS.md) would carry over to bf16 on
this CPU: only if both runtimes gain alike from bf16.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clip_setup  # noqa: E402  pylint: disable=g-import-not-at-top


def cpu_rate(fn, flops, repeats):
  """flops / median process CPU seconds of fn() (after one untimed call)."""
  fn()
  ts = []
  for _ in range(repeats):
    c = time.process_time()
    fn()
    ts.append(time.process_time() - c)
  return flops / max(statistics.median(ts), 1e-9)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="1024,2048")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=8)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  threads = clip_setup.set_torch_threads()
  print(f"machine: {clip_setup.machine()}; torch {torch.__version__}, "
        f"{threads} thread(s); load average {clip_setup.load_average()}")
  dot = jax.jit(jnp.dot)
  rows = []
  for n in [int(s) for s in args.sizes.split(",") if s]:
    for dtype in [d for d in args.dtypes.split(",") if d]:
      x = jnp.full((n, n), 0.5, dtype)
      t = torch.full((n, n), 0.5, dtype=getattr(torch, dtype))
      row = {"n": n, "dtype": dtype,
             "jax": cpu_rate(lambda: dot(x, x).block_until_ready(),
                             2 * n ** 3, args.repeats),
             "torch": cpu_rate(lambda: t @ t, 2 * n ** 3, args.repeats)}
      print(f"  {n}^3 {dtype:<9} jnp.dot {row['jax'] / 1e9:7.1f}  "
            f"torch.matmul {row['torch'] / 1e9:7.1f} GFLOP per CPU second")
      rows.append(row)
  return rows


if __name__ == "__main__":
  main()
