r"""Model FLOPs utilisation of the hica-jax train step against the measured matmul peak.

  python bench/mfu.py                       # CPU preset (bench/clip_setup.py)
  python bench/mfu.py --with_torch          # also PyTorch CLIPModel eager
  python bench/mfu.py --preset gpu --batches 32,64,128,256 \
      --nominal_peak_tflops 989             # H100 SXM dense bf16
  python bench/mfu.py --tiny                # seconds (tests)

For the CLIP-equivalent step of bench/train_step.py (hica-jax, global loss,
clip + AdamW):
1. model FLOPs per step, analytic (clip_setup.train_step_flops: every
   matmul, backward = 2x forward, the pixels get no gradient), cross-checked
   with XLA's `cost_analysis()` of the compiled step (which also counts
   elementwise work and the optimiser);
2. the first step's trace + lower and compile seconds;
3. in alternating rounds: the dense matmul peak (jitted jnp.dot of square
   `--sizes`, same dtype, same process; best size per round) and one train
   step. MFU = analytic FLOPs / step seconds / peak, median over rounds
   (a load change hits the peak and the step of a round alike);
4. the matmul rate of the model's own dense shapes ([tokens, width] x
   [width, mlp] ...): the ceiling a step made only of those matmuls reaches.
"""
import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clip_setup  # noqa: E402  pylint: disable=g-import-not-at-top


def model_matmul_shapes(a):
  """(m, k, n) of the image tower's dense layers for the whole batch."""
  tokens = a.batch * (a.patches + 1)
  return [(tokens, a.width, a.width), (tokens, a.width, a.mlp),
          (tokens, a.mlp, a.width)]


def best(rates):
  return max(rates.values())


def measure(arch, rounds, sizes, with_torch, torch_device):
  """One batch size: FLOPs, compile time, alternating peak / step rounds."""
  flops = clip_setup.train_step_flops(arch)
  runner = clip_setup.HicaRunner(arch, "clip")
  compiled, compile_times = runner.compiled, runner.compile_times
  xla = clip_setup.xla_flops(compiled)
  runner()  # the first run (allocation, caches): not timed
  fns = {"hica": runner}
  if with_torch:
    fns["torch"] = clip_setup.TorchRunner(arch, device=torch_device)
    fns["torch"]()
  peaks, steps = [], {n: [] for n in fns}
  for _ in range(rounds):
    peaks.append(best(clip_setup.jax_matmul_peak(arch.dtype, sizes,
                                                 repeats=3)))
    for name, fn in fns.items():
      steps[name].append(clip_setup.timed(fn))
  res = {"batch": arch.batch, "load_average": clip_setup.load_average(),
         "analytic_flops": flops, "xla_flops": xla,
         "xla_over_analytic": None if xla is None else xla / flops["total"],
         **compile_times,
         "peak_flops_per_s": clip_setup.summary(peaks),
         "model_shape_rates": clip_setup.jax_matmul_peak(
             arch.dtype, (), repeats=3, shapes=model_matmul_shapes(arch)),
         "systems": {}}
  for name, ts in steps.items():
    mfu = [flops["total"] / t / p for t, p in zip(ts, peaks)]
    res["systems"][name] = {
        "step_s": clip_setup.summary(ts),
        "flops_per_s": flops["total"] / statistics.median(ts),
        "mfu": statistics.median(mfu), "mfu_min": min(mfu),
        "mfu_max": max(mfu)}
  return res


def print_result(r, nominal_peak, log=print):
  f = r["analytic_flops"]
  log(f"batch {r['batch']}  (load average after: {r['load_average']})")
  log(f"  analytic GFLOP/step {f['total'] / 1e9:.2f} (image tower "
      f"{f['image_tower'] / 1e9:.2f}, text tower {f['text_tower'] / 1e9:.2f}, "
      f"projections+logits {f['projections_and_logits'] / 1e9:.3f})")
  if r["xla_flops"] is not None:
    log(f"  XLA cost_analysis GFLOP/step {r['xla_flops'] / 1e9:.2f} "
        f"({r['xla_over_analytic']:.3f} x analytic)")
  log(f"  first step: trace+lower {r['trace_lower_s']:.1f} s, compile "
      f"{r['compile_s']:.1f} s")
  p = r["peak_flops_per_s"]
  log(f"  matmul peak GFLOP/s: median {p['median'] / 1e9:.1f} "
      f"(min {p['min'] / 1e9:.1f}, max {p['max'] / 1e9:.1f})")
  log("  model-shape matmul GFLOP/s: " + ", ".join(
      f"{k} {v / 1e9:.1f}" for k, v in r["model_shape_rates"].items()))
  for name, s in r["systems"].items():
    st = s["step_s"]
    line = (f"  {name:<6} step median {st['median']:.3f} s (min {st['min']:.3f},"
            f" max {st['max']:.3f}); {s['flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"MFU vs measured peak {100 * s['mfu']:.1f}% "
            f"({100 * s['mfu_min']:.1f}-{100 * s['mfu_max']:.1f})")
    if nominal_peak:
      line += f"; vs nominal {100 * s['flops_per_s'] / nominal_peak:.1f}%"
    log(line)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawTextHelpFormatter)
  clip_setup.add_arch_args(parser)
  parser.add_argument("--batches", default="",
                      help="comma list of batch sizes; default: the preset's")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--sizes", default="",
                      help="square matmul sizes for the peak (default "
                           "1024,2048 on CPU, 4096,8192 on GPU)")
  parser.add_argument("--with_torch", action="store_true",
                      help="also time PyTorch CLIPModel eager in the rounds")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch threads (0: the usable cores)")
  parser.add_argument("--nominal_peak_tflops", type=float, default=0.0,
                      help="the device's datasheet peak, to report MFU "
                           "against it as well (H100 SXM bf16 dense: 989)")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args(argv)
  clip_setup.line_buffered_stdout()
  import jax  # pylint: disable=g-import-not-at-top
  gpu = jax.devices()[0].platform == "gpu"
  if args.tiny:
    args.rounds = min(args.rounds, 2)
  sizes = [int(s) for s in args.sizes.split(",") if s] or (
      [256] if args.tiny else [4096, 8192] if gpu else [1024, 2048])
  clip_setup.set_torch_threads(args.threads or None)
  base = clip_setup.arch_from_args(args)
  batches = [int(b) for b in args.batches.split(",") if b] or [base.batch]
  print(f"machine: {clip_setup.machine()}; load average "
        f"{clip_setup.load_average()}")
  print(f"arch: {base}")
  nominal = args.nominal_peak_tflops * 1e12
  results = []
  for b in batches:
    r = measure(dataclasses.replace(base, batch=b), args.rounds, sizes,
                args.with_torch, "cuda" if gpu else "cpu")
    print_result(r, nominal)
    results.append(r)
  return clip_setup.report(results, base, args.json_out)


if __name__ == "__main__":
  main()
