r"""Image-tower forward + backward time per tower shape, at stage 1's batch.

  taskset -c 0 python bench/image_tower_step.py           # one core
  python bench/image_tower_step.py --rounds 5 --out /tmp/tower_step.jsonl
  python bench/image_tower_step.py --tiny                  # seconds (tests)

SwAV's step on real images embeds `stage1.batch_size` x `num_global` views
at `data.image_size` and as many x `num_local` at `local_size` (64 x 2 at
64 px and 64 x 2 at 32 px with the real-image defaults). For each tower in
`--towers` (name=json overrides of config.model.image, on the chest X-ray
config's real-image tower fields) this times jax.value_and_grad of the sum
of the pooled features over both crop sizes, jitted: median, min and max
seconds over `--rounds` rounds after one untimed (compiling) call, the
rounds interleaved across towers so that load changes hit all alike, and
the image parameters. The figure is what the tower adds to a stage-1 step;
the prototype head, the Sinkhorn balancing and the text tower come on top.
On XLA:CPU a 3x3 convolution over a wide grid is costly: the ResNet's
block on its first, 32x32 grid takes more than half of its step.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import testing
from hica_jax.models import hica_model

TOWERS = (
    'vit={"arch": "vit"}',
    'resnet={"arch": "resnet", "pool": "gap", "depth": 1}',
    'resnet_011={"arch": "resnet", "pool": "gap", "depth": 1, '
    '"stage_depths": [0, 1, 1]}',
)


def tower_fn(overrides, tiny):
  """(jitted value_and_grad of the pooled sum over crops, params)."""
  config = testing.config("chestxray", "tiny" if tiny else "")
  config.model.image.update(overrides)
  if config.model.image.get("stage_depths") is not None:
    config.model.image.stage_depths = tuple(config.model.image.stage_depths)
  tower = hica_model.image_tower(hica_model.image_tower_kwargs(config.model))
  size = config.data.image_size
  params = tower.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))

  def loss(p, crops):
    return sum(tower.apply(p, c)["pooled"].sum() for c in crops)
  return jax.jit(jax.value_and_grad(loss)), params, config


def crops(config, tiny):
  """Stage 1's multi-crop batch: global views, then local ones."""
  s1 = config.stage1
  b = 4 if tiny else s1.batch_size
  rng = np.random.RandomState(0)
  sizes = ((config.data.image_size, s1.swav.num_global),
           (s1.swav.local_size, s1.swav.num_local))
  return [jnp.asarray(rng.randn(b * n, s, s, 1).astype(np.float32))
          for s, n in sizes if n]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--towers", action="append", default=None,
                      help="name={json overrides of config.model.image}")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default="/tmp/image_tower_step.jsonl",
                      help="JSON lines, appended")
  args = parser.parse_args(argv)
  runs = {}
  for spec in args.towers or TOWERS:
    name, _, blob = spec.partition("=")
    fn, params, config = tower_fn(json.loads(blob), args.tiny)
    batch = crops(config, args.tiny)
    jax.block_until_ready(fn(params, batch))   # compile
    n_params = sum(x.size for x in jax.tree.leaves(params))
    runs[name] = dict(fn=fn, params=params, batch=batch, times=[],
                      n_params=int(n_params), overrides=json.loads(blob))
  for _ in range(args.rounds):
    for run in runs.values():
      t = time.perf_counter()
      jax.block_until_ready(run["fn"](run["params"], run["batch"]))
      run["times"].append(time.perf_counter() - t)
  rows = []
  for name, run in runs.items():
    row = {"tower": name, "overrides": run["overrides"],
           "image_params": run["n_params"],
           "median_s": statistics.median(run["times"]),
           "min_s": min(run["times"]), "max_s": max(run["times"]),
           "crops": [list(b.shape) for b in run["batch"]],
           "devices": jax.device_count()}
    rows.append(row)
    testing.emit_json_line(args.out, row)
  return rows


if __name__ == "__main__":
  main()
