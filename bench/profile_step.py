r"""Where the hica-jax train step's time goes, and what its first compile costs.

  python bench/profile_step.py                  # CPU preset: profile + compile
  python bench/profile_step.py --parts profile  # only the trace breakdown
  python bench/profile_step.py --parts compile --compile_archs default,cpu,gpu
  python bench/profile_step.py --tiny           # seconds (tests)

Parts (`--parts`, comma list):
  profile   `--steps` steps of the CLIP-equivalent step (bench/clip_setup.py)
            under `jax.profiler.trace` (the folder is printed; open it with
            TensorBoard / XProf). The XLA:CPU runtime records one event per
            executed HLO thunk; they are mapped to the optimised HLO of the
            compiled step and summed per category (matmul, attention matmul,
            elementwise, reductions, transposes/copies, gather/scatter, ...),
            with the matmul FLOPs of each category from its dot shapes.
  torch     the same step of transformers' CLIPModel (eager) under
            torch.profiler: self CPU time per op category, for comparison.
  ablation  forward only / forward + backward / the whole step (jitted
            separately, alternating rounds): the share of the backward pass
            and of the clip + AdamW update.
  compile   first-step trace+lower and compile seconds of a train step with
            `config.model.scan` off and on, from abstract shapes (nothing
            runs): `default` = train.make_stage2_step on the model of
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
import variants  # noqa: E402  pylint: disable=g-import-not-at-top

# ----------------------------------------------------------------------------
# Optimised HLO -> per-instruction category and matmul FLOPs.

_COMP_RE = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"(?:^|[\s)}])([a-z][a-z0-9\-]*)\(")
_SHAPE_RE = re.compile(r"^\(?\s*[a-z0-9]+\[([0-9,]*)\]")
_CALLS_RE = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_DIMS_RE = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_BATCH_RE = re.compile(r"lhs_batch_dims=\{([0-9,]*)\}")


def _dims(text):
  return [int(x) for x in text.split(",") if x]


def parse_hlo(text):
  """Optimised HLO text -> ({instr: info}, {computation: [instr names]}).

  info: opcode, shape (the first array shape of the result), calls (called
  computations), operands (names), line.
  """
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _INSTR_RE.match(line)
    if m and current is not None and line[:1].isspace():
      name, rhs = m.groups()
      op = _OPCODE_RE.search(rhs)
      shape = _SHAPE_RE.match(rhs)
      args = rhs[op.end():] if op else ""
      instrs[name] = {
          "opcode": op.group(1) if op else "?",
          "shape": _dims(shape.group(1)) if shape else [],
          "calls": _CALLS_RE.findall(rhs),
          "operands": re.findall(r"%([\w.\-]+)", args.split("),")[0]),
          "op_name": (re.search(r'op_name="([^"]*)"', rhs) or [None, ""])[1],
          "line": rhs, "computation": current}
      comps[current].append(name)
      continue
    m = _COMP_RE.match(line)
    if m and not line[0].isspace():  # instructions are indented
      current = m.group(1)
    elif line.strip() == "}":
      current = None
  return instrs, comps


def dot_flops(name, instrs):
  """2 x output size x contracted size of a dot instruction (0 if unknown)."""
  info = instrs[name]
  out = 1
  for d in info["shape"]:
    out *= d
  lhs = instrs.get(info["operands"][0]) if info["operands"] else None
  m = _DIMS_RE.search(info["line"])
  if lhs is None or m is None:
    return 0
  k = 1
  for d in _dims(m.group(1)):
    k *= lhs["shape"][d] if d < len(lhs["shape"]) else 1
  return 2 * out * k


def _called(name, instrs, comps, seen=None):
  """Every instruction in the computations `name` calls, recursively."""
  seen = set() if seen is None else seen
  out = []
  for comp in instrs[name]["calls"]:
    if comp in seen:
      continue
    seen.add(comp)
    for inner in comps.get(comp, []):
      out.append(inner)
      out.extend(_called(inner, instrs, comps, seen))
  return out


def classify(name, instrs, comps):
  """(category, matmul FLOPs) of one executed HLO instruction."""
  info = instrs.get(name)
  if info is None:
    return "unmapped", 0
  inner = _called(name, instrs, comps) if info["calls"] else []
  ops = collections.Counter([instrs[i]["opcode"] for i in inner])
  ops[info["opcode"]] += 1
  dots = [i for i in inner + [name] if instrs[i]["opcode"] == "dot"]
  if dots:
    flops = sum(dot_flops(d, instrs) for d in dots)
    batched = any(_dims(m.group(1)) for d in dots
                  for m in [_BATCH_RE.search(instrs[d]["line"])] if m)
    return ("matmul, batched (attention)" if batched else "matmul, dense",
            flops)
  if ops["convolution"]:
    return "convolution", 0
  if info["opcode"] in ("while", "call", "conditional"):
    return "control flow", 0
  for op, cat in (("scatter", "gather/scatter"), ("gather", "gather/scatter"),
                  ("reduce", "reduction fusion (norms, softmax, sums)"),
                  ("sort", "other")):
    if ops[op]:
      return cat, 0
  if info["opcode"] in ("copy", "transpose") or (
      ops["transpose"] or ops["copy"]) and info["opcode"] == "fusion" and not (
          ops["add"] or ops["multiply"] or ops["exponential"]):
    return "transpose/copy", 0
  if info["opcode"] in ("fusion", "add", "multiply", "select", "convert",
                        "broadcast", "subtract", "divide", "exponential"):
    return "elementwise fusion", 0
  return f"other ({info['opcode']})", 0


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
          out.append((stats["hlo_op"], ev.duration_ns))
  return out


def breakdown(events, instrs, comps, steps):
  """Per-category ms per step, share, event count, matmul GFLOP/s."""
  acc = collections.defaultdict(lambda: [0.0, 0, 0])
  for op, ns in events:
    cat, flops = classify(op, instrs, comps)
    acc[cat][0] += ns / 1e6 / steps
    acc[cat][1] += 1
    acc[cat][2] += flops / steps
  total = sum(v[0] for v in acc.values()) or 1.0
  rows = []
  for cat, (ms, n, flops) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
    rows.append({"category": cat, "ms_per_step": ms, "share": ms / total,
                 "events_per_step": n / steps, "gflop_per_step": flops / 1e9,
                 "gflop_per_s": flops / ms / 1e6 if flops and ms else None})
  return rows, total


def _short(op_name):
  """'jit(step)/transpose(jvp(HiCAModel.encode_image))/image/encoder/block_0/
  mlp/fc1/dot_general' -> 'bwd image/block_0/mlp/fc1/dot_general'."""
  bwd = "transpose(" in op_name
  parts = [p for p in op_name.split("/") if p and not p.startswith(
      ("jit(", "jvp(", "transpose(")) and p != "encoder"]
  return ("bwd " if bwd else "") + "/".join(parts)[-60:]


def top_ops(events, instrs, steps, n=12, category=None, classify_fn=None):
  """The n most expensive instructions: (name, category, shape, ms/step, op)."""
  acc = collections.defaultdict(float)
  for op, ns in events:
    acc[op] += ns / 1e6 / steps
  rows = []
  for op, ms in sorted(acc.items(), key=lambda kv: -kv[1]):
    cat = classify_fn(op)[0]
    if category is not None and cat != category:
      continue
    info = instrs.get(op, {})
    rows.append((op, cat, info.get("shape"), ms,
                 _short(info.get("op_name", ""))))
    if len(rows) == n:
      break
  return rows


# ----------------------------------------------------------------------------
# Parts.


def part_profile(arch, steps, trace_root, variant="baseline", top=8,
                 log=print):
  import jax  # pylint: disable=g-import-not-at-top
  runner = clip_setup.HicaRunner(arch, "clip", variant=variant)
  compiled = runner.compiled
  runner()
  runner()
  trace_dir = os.path.join(trace_root, time.strftime("%Y%m%d-%H%M%S"))
  walls = []
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      walls.append(clip_setup.timed(runner))
  instrs, comps = parse_hlo(compiled.as_text())
  events = thunk_events(trace_dir)
  rows, thunk_ms = breakdown(events, instrs, comps, steps)
  wall_ms = 1e3 * statistics.median(walls)
  log(f"trace written to {trace_dir} (tensorboard --logdir {trace_root})")
  log(f"{steps} traced steps, median wall {wall_ms:.1f} ms/step; summed "
      f"thunk time {thunk_ms:.1f} ms/step (load average "
      f"{clip_setup.load_average()})")
  log(f"  {'category':<42} {'ms/step':>9} {'share':>6} {'ops':>6} "
      f"{'GFLOP':>7} {'GFLOP/s':>8}")
  for r in rows:
    rate = "" if r["gflop_per_s"] is None else f"{r['gflop_per_s']:.1f}"
    log(f"  {r['category']:<42} {r['ms_per_step']:9.1f} "
        f"{100 * r['share']:5.1f}% {r['events_per_step']:6.0f} "
        f"{r['gflop_per_step']:7.1f} {rate:>8}")
  classify_fn = lambda op: classify(op, instrs, comps)
  for category in [None] + [r["category"] for r in rows[:4]]:
    log(f"  most expensive instructions, {category or 'all'} (ms/step):")
    for op, cat, shape, ms, where in top_ops(events, instrs, steps, top,
                                             category, classify_fn):
      log(f"    {ms:8.1f}  {op:<30} {str(shape):<18} {where}")
  return {"trace_dir": trace_dir, "wall_ms": wall_ms, "thunk_ms": thunk_ms,
          "categories": rows}


def part_ablation(arch, rounds, variant="baseline", log=print):
  """Forward / forward+backward / whole step, jitted apart, alternating."""
  import jax  # pylint: disable=g-import-not-at-top
  runner = clip_setup.HicaRunner(arch, "clip", variant=variant)
  batch = runner.args[0]
  loss = lambda p, b: runner.loss_fn(p, b)[0]
  with variants.variant(variant):
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
  log(f"ablation ({variant}), median of {rounds} rounds (load average "
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
  """make_stage2_step on configs/chestxray_fewshot.py's model, abstract inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hica_jax import train  # pylint: disable=g-import-not-at-top
  from hica_jax.data import descriptors  # pylint: disable=g-import-not-at-top
  from hica_jax.models import build_model  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs"))
  import chestxray_fewshot  # pylint: disable=g-import-not-at-top
  config = chestxray_fewshot.get_config("tiny" if tiny else None)
  config.model.scan = scan
  model = build_model(config.model, config.tokenizer.vocab_size)
  bank = descriptors.load_bank(f"synthetic_{config.data.family}")
  seen = [c for c in bank["categories"] if c not in bank.get("unseen", [])]
  num_desc = sum(len(bank["categories"][c]["sentences"]) for c in seen)
  b, size = config.stage2.batch_size, config.data.image_size
  length, lp = config.model.text.max_len, config.data.max_phrase_len
  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  batch = {"image": sds((b, size, size, 3), f32),
           "roi_mask": sds((b, size, size), f32), "has_roi": sds((b,), f32),
           "label": sds((b,), i32), "text_ids": sds((b, length), i32),
           "text_mask": sds((b, length), i32),
           "phrase_ids": sds((b, lp), i32), "phrase_mask": sds((b, lp), i32),
           "phrase_id": sds((b,), i32)}
  desc = {"ids": sds((num_desc, length), i32),
          "mask": sds((num_desc, length), i32),
          "category": sds((num_desc,), i32)}
  images, ids = sds((1, size, size, 3), f32), sds((1, length), i32)
  tx, _ = train.make_optimizer(config.stage2.optim, config.stage2.steps,
                               jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                              images, ids, ids))
  state = clip_setup.abstract_state(model, tx, images, ids)
  step = train.make_stage2_step(model, tx, train.loss_weights(
      config.stage2.loss), len(seen))
  return _compile_seconds(lambda: step.lower(state, batch, desc, sds((), f32)))


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
  parser.add_argument("--variant", default="baseline",
                      choices=variants.VARIANTS,
                      help="model-code variant to profile (bench/variants.py)")
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
    out["profile"] = part_profile(arch, args.steps, args.trace_dir,
                                  args.variant)
  if "torch" in parts:
    clip_setup.set_torch_threads(args.threads or None)
    out["torch"] = part_torch(arch, args.steps)
  if "ablation" in parts:
    out["ablation"] = part_ablation(arch, args.rounds, args.variant)
  if "compile" in parts:
    out["compile"] = part_compile(
        [a for a in args.compile_archs.split(",") if a], args.tiny)
  return out


if __name__ == "__main__":
  main()
