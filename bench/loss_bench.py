"""Time and peak temporary memory of the HiCA global and local loss terms.

Sweeps the global batch size on 8 devices (8 fake CPU devices on a CPU-only
machine), plain form vs chunked form, for a jitted forward + backward step
(gradients w.r.t. the embeddings, taken outside `shard_map` as a train step
does). Memory is XLA's compiled `memory_analysis().temp_size_in_bytes` of the
per-device program (compile only, so it is reported for every size); time is
the median wall time of `--repeats` runs, for sizes up to `--time_max_batch`.

  python bench/loss_bench.py                       # full sweep
  python bench/loss_bench.py --batches 256,1024 --time_max_batch 1024
"""
import argparse
import functools
import json
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hica_jax import losses  # noqa: E402


def _inputs(term, batch, dim, patches, tokens):
  """Shapes/dtypes of the differentiable and the fixed inputs of a term."""
  f32, i32 = jnp.float32, jnp.int32
  if term == "global":
    diff = {"image_emb": ((batch, dim), f32), "text_emb": ((batch, dim), f32)}
    fixed = {"label": ((batch,), i32)}
  elif term == "local_roi":
    side = int(np.sqrt(patches))
    diff = {"patch_emb": ((batch, patches, dim), f32),
            "phrase_emb": ((batch, dim), f32)}
    fixed = {"roi_mask": ((batch, side, side), f32), "has_roi": ((batch,), f32),
             "phrase_id": ((batch,), i32)}
  else:  # local_attention
    diff = {"patch_emb": ((batch, patches, dim), f32),
            "phrase_tokens": ((batch, tokens, dim), f32)}
    fixed = {"phrase_mask": ((batch, tokens), i32), "has_roi": ((batch,), f32),
             "phrase_id": ((batch,), i32)}
  return diff, fixed


def _loss(term, chunk, diff, fixed, axis_name):
  s = 10.0
  if term == "global":
    return losses.global_contrastive_loss(
        diff["image_emb"], diff["text_emb"], s, fixed["label"], axis_name,
        chunk_size=chunk)
  if term == "local_roi":
    return losses.local_alignment_loss(
        diff["patch_emb"], s, "roi", roi_mask=fixed["roi_mask"],
        phrase_emb=diff["phrase_emb"], phrase_id=fixed["phrase_id"],
        has_roi=fixed["has_roi"], axis_name=axis_name, chunk_size=chunk)
  return losses.local_alignment_loss(
      diff["patch_emb"], s, "attention", phrase_tokens=diff["phrase_tokens"],
      phrase_mask=fixed["phrase_mask"], phrase_id=fixed["phrase_id"],
      has_roi=fixed["has_roi"], axis_name=axis_name, chunk_size=chunk)


def _step(mesh, term, chunk):
  """jit(value_and_grad(shard_map(loss))) over the 'data' axis."""
  def loss(diff, fixed):
    return jax.shard_map(
        functools.partial(_loss, term, chunk, axis_name="data"), mesh=mesh,
        in_specs=(P("data"), P("data")), out_specs=P(),
        check_vma=False)(diff, fixed)
  return jax.jit(jax.value_and_grad(loss))


def _random(shape_dtypes, sharding, rng):
  out = {}
  for k, (shape, dtype) in shape_dtypes.items():
    if k == "has_roi":
      x = (rng.random(shape) < 0.75).astype(np.float32)
    elif k in ("label", "phrase_id"):
      x = rng.integers(0, 16, shape).astype(np.int32)
    elif k in ("roi_mask", "phrase_mask"):
      x = (rng.random(shape) < 0.5).astype(dtype)
    else:
      x = rng.standard_normal(shape, np.float32)
    out[k] = jax.device_put(x, sharding)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="256,512,1024,2048,4096,8192,16384")
  parser.add_argument("--terms", default="global,local_roi,local_attention")
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--patches", type=int, default=16)
  parser.add_argument("--tokens", type=int, default=8)
  parser.add_argument("--time_max_batch", type=int, default=4096)
  parser.add_argument("--attention_time_max_batch", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="", help="also write rows here")
  args = parser.parse_args()

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  rows = []
  print(f"devices={jax.device_count()} ({jax.devices()[0].platform}) "
        f"dim={args.dim} patches={args.patches} tokens={args.tokens} "
        f"chunk={args.chunk}")
  print("| term | global B | B/device | form | temp MiB/device | "
        "fwd+bwd ms |")
  print("| --- | ---: | ---: | --- | ---: | ---: |")
  for term in args.terms.split(","):
    for batch in [int(b) for b in args.batches.split(",")]:
      for form, chunk in (("plain", None), ("chunked", args.chunk)):
        diff, fixed = _inputs(term, batch, args.dim, args.patches,
                              args.tokens)
        abstract = lambda d: {k: jax.ShapeDtypeStruct(s, t, sharding=sharding)
                              for k, (s, t) in d.items()}
        step = _step(mesh, term, chunk)
        compiled = step.lower(abstract(diff), abstract(fixed)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        limit = (args.attention_time_max_batch if term == "local_attention"
                 else args.time_max_batch)
        ms = None
        if batch <= limit:
          d, f = _random(diff, sharding, rng), _random(fixed, sharding, rng)
          jax.block_until_ready(compiled(d, f))
          times = []
          for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(d, f))
            times.append(time.perf_counter() - t0)
          ms = 1e3 * float(np.median(times))
          del d, f
        rows.append({"term": term, "batch": batch, "per_device": batch // 8,
                     "form": form, "chunk": chunk, "temp_mib": temp,
                     "ms": ms})
        ms_txt = "-" if ms is None else f"{ms:.1f}"
        print(f"| {term} | {batch} | {batch // 8} | {form} | {temp:.1f} | "
              f"{ms_txt} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
