r"""Where the hica-jax train step's time goes, and what its first compile costs.

  python bench/profile_step.py                  # CPU preset: profile + compile
  python bench/profile_step.py --parts profile  # only the trace breakdown
  python bench/profile_step.py --parts compile --compile_archs default,cpu,gpu
  python bench/profile_step.py --tiny           # seconds (tests)

Parts (`--parts`, comma list):
  profile   `--steps` steps of the CLIP-equivalent step (bench/clip_setup.py)
            under `jax.profiler.trace` (the folder is printed; open it with
            TensorBoard / XProf for the per-op view). The XLA:CPU runtime
            records one event per executed HLO thunk; printed here: their
            time per step summed by HLO instruction kind (the name without
            its number: ynn_fusion = YNNPACK dots, dot_general, copy,
            <ops>_fusion, ...) and the most expensive instructions.
  torch     the same step of transformers' CLIPModel (eager) under
            torch.profiler: self CPU time per op category, for comparison.
  ablation  forward only / forward + backward / the whole step (jitted
            separately, alternating rounds): the share of the backward pass
            and of the clip + AdamW update.
  compile   first-step trace+lower and compile seconds of a train step with
            `config.model.scan` off and on, from abstract shapes (nothing
            runs): `default` = the stage-2 step (stage2.make_stage2_step,
            all three loss terms) on the model of
            configs/chestxray_fewshot.py (its batch, phrases, descriptors);
            `cpu` / `gpu` = the CLIP-equivalent step of that preset (gpu:
            ViT-B/16 + 12-layer text; compiled here for this machine).
"""
import argparse
import collections
import glob
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clip_setup  # noqa: E402  pylint: disable=g-import-not-at-top


def thunk_events(trace_dir, module_prefix="jit_step"):
  """(hlo_op, duration ns) of every executed thunk of the traced module."""
  import jax  # pylint: disable=g-import-not-at-top
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  out = []
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" in stats and str(stats.get("hlo_module", "")).startswith(
            module_prefix):
          out.append((str(stats["hlo_op"]), ev.duration_ns))
  return out


def per_step_ms(events, steps, key=lambda op: op):
  """[{"name", "ms_per_step", "share", "events_per_step"}] summed by
  key(op), most expensive first, and the summed thunk ms per step."""
  acc = collections.defaultdict(lambda: [0.0, 0])
  for op, ns in events:
    acc[key(op)][0] += ns / 1e6 / steps
    acc[key(op)][1] += 1
  total = sum(ms for ms, _ in acc.values()) or 1.0
  rows = [{"name": name, "ms_per_step": ms, "share": ms / total,
           "events_per_step": n / steps}
          for name, (ms, n) in sorted(acc.items(), key=lambda kv: -kv[1][0])]
  return rows, total


def op_kind(op):
  """'ynn_fusion.40' -> 'ynn_fusion', 'copy.425' -> 'copy'."""
  return re.sub(r"\.\d+$", "", op)


# ----------------------------------------------------------------------------
# Parts.


def part_profile(arch, steps, trace_root, top=12, log=print):
  import jax  # pylint: disable=g-import-not-at-top
  runner = clip_setup.HicaRunner(arch, "clip")
  runner()
  runner()
  trace_dir = os.path.join(trace_root, time.strftime("%Y%m%d-%H%M%S"))
  walls = []
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      walls.append(clip_setup.timed(runner))
  events = thunk_events(trace_dir)
  kinds, thunk_ms = per_step_ms(events, steps, op_kind)
  ops, _ = per_step_ms(events, steps)
  wall_ms = 1e3 * statistics.median(walls)
  log(f"trace written to {trace_dir} (tensorboard --logdir {trace_root})")
  log(f"{steps} traced steps, median wall {wall_ms:.1f} ms/step; summed "
      f"thunk time {thunk_ms:.1f} ms/step (load average "
      f"{clip_setup.load_average()})")
  for title, rows in (("HLO instruction kind", kinds[:top]),
                      ("most expensive instructions", ops[:top])):
    log(f"  {title:<42} {'ms/step':>9} {'share':>6} {'ops':>6}")
    for r in rows:
      log(f"  {r['name'][:42]:<42} {r['ms_per_step']:9.1f} "
          f"{100 * r['share']:5.1f}% {r['events_per_step']:6.0f}")
  return {"trace_dir": trace_dir, "wall_ms": wall_ms, "thunk_ms": thunk_ms,
          "kinds": kinds, "top_ops": ops[:top]}


def part_ablation(arch, rounds, log=print):
  """Forward / forward+backward / whole step, jitted apart, alternating."""
  import jax  # pylint: disable=g-import-not-at-top
  runner = clip_setup.HicaRunner(arch, "clip")
  batch = runner.args[0]
  loss = lambda p, b: runner.loss_fn(p, b)[0]
  fwd = jax.jit(loss).lower(runner.state.params, batch).compile()
  grad = jax.jit(jax.value_and_grad(loss)).lower(
      runner.state.params, batch).compile()
  # The step donates its state: read the params it holds at each call.
  fns = {"forward": lambda: jax.block_until_ready(
             fwd(runner.state.params, batch)),
         "forward+backward": lambda: jax.block_until_ready(
             grad(runner.state.params, batch)),
         "whole step": runner}
  wall, _ = clip_setup.alternate(fns, rounds, warmup=1)
  med = {k: statistics.median(v) for k, v in wall.items()}
  log(f"ablation, median of {rounds} rounds (load average "
      f"{clip_setup.load_average()}):")
  parts = {"forward": med["forward"],
           "backward": med["forward+backward"] - med["forward"],
           "clip + AdamW + bookkeeping": med["whole step"]
                                         - med["forward+backward"]}
  for k, v in parts.items():
    log(f"  {k:<28} {1e3 * v:9.1f} ms  {100 * v / med['whole step']:5.1f}%")
  log(f"  {'whole step':<28} {1e3 * med['whole step']:9.1f} ms")
  return {"median_s": med, "parts_s": parts}


_TORCH_CATEGORIES = (
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("matmul, dense + batched", ("aten::mm", "aten::addmm", "aten::bmm",
                                 "aten::baddbmm", "aten::addmv")),
    ("convolution", ("convolution", "conv2d")),
    ("optimizer (foreach AdamW, clip)", ("_foreach", "adamw", "norm_")),
    ("layer norm", ("layer_norm",)),
    ("gather/scatter (embedding)", ("embedding", "index", "scatter",
                                    "gather")),
)


def torch_category(name):
  low = name.lower()
  for cat, keys in _TORCH_CATEGORIES:
    if any(k in low for k in keys):
      return cat
  return "elementwise and other ops"


def part_torch(arch, steps, log=print):
  """transformers CLIPModel eager under torch.profiler: self CPU time per
  op category (the same categories, as far as the two runtimes allow)."""
  import torch  # pylint: disable=g-import-not-at-top
  runner = clip_setup.TorchRunner(arch)
  runner()
  runner()
  walls = []
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      walls.append(clip_setup.timed(runner))
  acc = collections.defaultdict(lambda: [0.0, 0])
  for ev in prof.key_averages():
    acc[torch_category(ev.key)][0] += ev.self_cpu_time_total / 1e3 / steps
    acc[torch_category(ev.key)][1] += ev.count / steps
  total = sum(v[0] for v in acc.values()) or 1.0
  wall_ms = 1e3 * statistics.median(walls)
  log(f"torch CLIPModel eager, {steps} profiled steps: median wall "
      f"{wall_ms:.1f} ms/step, summed self CPU time {total:.1f} ms/step "
      f"(load average {clip_setup.load_average()})")
  rows = []
  for cat, (ms, n) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
    rows.append({"category": cat, "ms_per_step": ms, "share": ms / total,
                 "ops_per_step": n})
    log(f"  {cat:<42} {ms:9.1f} {100 * ms / total:5.1f}% {n:6.0f}")
  top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  log("  most expensive ops (self ms/step): " + ", ".join(
      f"{e.key} {e.self_cpu_time_total / 1e3 / steps:.0f}" for e in top[:8]))
  return {"wall_ms": wall_ms, "self_ms": total, "categories": rows}


def _compile_seconds(lower):
  """(trace+lower s, compile s, compile CPU s of this process)."""
  t = time.perf_counter()
  lowered = lower()
  t_lower = time.perf_counter() - t
  t, c = time.perf_counter(), time.process_time()
  lowered.compile()
  return t_lower, time.perf_counter() - t, time.process_time() - c


def compile_default(scan, tiny=False):
  """The stage-2 step of configs/chestxray_fewshot.py (all three loss terms;
  its model, batch, phrases and descriptors), from abstract inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hica_jax import testing  # pylint: disable=g-import-not-at-top
  from hica_jax.data import descriptors  # pylint: disable=g-import-not-at-top
  from hica_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from hica_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from hica_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = testing.config("chestxray", "tiny" if tiny else None)
  config.model.scan = scan
  model = build_model(config.model, config.tokenizer.vocab_size)
  bank = descriptors.load_bank(config.data.bank or synthetic.bank_name(
      pipeline.SYNTHETIC_FAMILY[config.data.dataset]))
  seen = [c for c in bank["categories"] if c not in bank.get("unseen", [])]
  num_desc = sum(len(bank["categories"][c]["sentences"]) for c in seen)
  batch, _ = testing.fake_stage2_batch(config, config.stage2.batch_size,
                                       len(seen))
  sds = jax.ShapeDtypeStruct
  batch = jax.tree.map(lambda x: sds(x.shape, x.dtype), batch)
  length = config.model.text.max_len
  desc = {"ids": sds((num_desc, length), jnp.int32),
          "mask": sds((num_desc, length), jnp.int32),
          "category": sds((num_desc,), jnp.int32)}
  return _compile_seconds(lambda: clip_setup.lower_stage2_step(
      config, model, batch, desc, len(seen)))


def part_compile(archs, tiny, log=print):
  """Trace+lower and compile seconds, scan off / on, per config."""
  import jax  # pylint: disable=g-import-not-at-top
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return _compile_rows(archs, tiny, log)
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)


def _compile_rows(archs, tiny, log):
  rows = []
  log(f"first-step compile (no compilation cache; load average "
      f"{clip_setup.load_average()}):")
  log(f"  {'config':<10} {'scan':>5} {'trace+lower s':>14} {'compile s':>10} "
      f"{'total s':>8} {'compile CPU s':>14}")
  for name in archs:
    for scan in (False, True):
      if name == "default":
        lower_s, compile_s, cpu_s = compile_default(scan, tiny)
      else:
        arch = clip_setup.preset(name, tiny, scan=scan)
        lower_s, compile_s, cpu_s = _compile_seconds(
            lambda: clip_setup.lower_clip_step(arch))
      rows.append({"config": name, "scan": scan, "trace_lower_s": lower_s,
                   "compile_s": compile_s, "compile_cpu_s": cpu_s})
      log(f"  {name:<10} {str(scan):>5} {lower_s:14.1f} {compile_s:10.1f} "
          f"{lower_s + compile_s:8.1f} {cpu_s:14.1f}")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawTextHelpFormatter)
  clip_setup.add_arch_args(parser)
  parser.add_argument("--parts", default="profile,torch,ablation,compile")
  parser.add_argument("--steps", type=int, default=3,
                      help="traced steps (profile)")
  parser.add_argument("--rounds", type=int, default=3, help="ablation rounds")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch threads (0: the usable cores)")
  parser.add_argument("--trace_dir", default="/tmp/hica_profile")
  parser.add_argument("--compile_archs", default="default,cpu",
                      help="comma list from default, cpu, gpu (compile part)")
  args = parser.parse_args(argv)
  clip_setup.line_buffered_stdout()
  parts = [p for p in args.parts.split(",") if p]
  arch = clip_setup.arch_from_args(args)
  print(f"machine: {clip_setup.machine()}; load average "
        f"{clip_setup.load_average()}")
  print(f"arch: {arch}")
  out = {}
  if "profile" in parts:
    out["profile"] = part_profile(arch, args.steps, args.trace_dir)
  if "torch" in parts:
    clip_setup.set_torch_threads(args.threads or None)
    out["torch"] = part_torch(arch, args.steps)
  if "ablation" in parts:
    out["ablation"] = part_ablation(arch, args.rounds)
  if "compile" in parts:
    out["compile"] = part_compile(
        [a for a in args.compile_archs.split(",") if a], args.tiny)
  return out


if __name__ == "__main__":
  main()
