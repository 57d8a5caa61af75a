r"""hica-jax train step against transformers' PyTorch CLIPModel, same config.

  python bench/train_step.py                     # 2-core CPU reference point
  python bench/train_step.py --systems hica,torch --rounds 5
  python bench/train_step.py --preset gpu --batches 32,64,128,256   # GPU sweep
  python bench/train_step.py --tiny              # seconds (tests)

One CLIP-equivalent configuration (bench/clip_setup.py: global loss only,
same widths, depths, heads, MLP, patch, image size, token length, vocabulary,
projection, activation, batch; clip-by-norm + AdamW with the same decay
mask) is built in one process by every system in `--systems`:
  hica         hica-jax: the stage-2 step (hica_jax.testing.stage2_trainer)
               with the global term only (one image and one text pass:
               terms of weight 0 embed nothing), jitted, state donated
               (clip_setup.HicaRunner);
  hica_scan    the same with config.model.scan (nn.scan over the layers);
  hica_stage2  the same step fed a full stage-2 batch (phrases, ROI masks,
               labels, D descriptors): since the zero-weight terms skip
               their inputs, it should cost what `hica` costs;
  torch        transformers CLIPModel(return_loss=True), eager;
  torch_compile  the same model under torch.compile (inductor; CPU needs a
               C++ compiler; skipped with the reason if it fails).
After `--warmup` untimed rounds (compilation), `--rounds` rounds run one step
of every system in turn, so load changes hit all alike. Reported per system:
median / min / max seconds per step, images per second from the median, and
for every other system the median over rounds of the per-round time ratio
against `torch` (>1: faster than PyTorch eager); also the process CPU
seconds per step (all threads) and their ratio. Run under `taskset -c 0`
(one core: torch and XLA then use one thread each, nothing spins) the CPU
seconds do not depend on other processes' load: the load-robust measure of
the work each system does. The load average is printed with the numbers:
the machine may be shared.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clip_setup  # noqa: E402  pylint: disable=g-import-not-at-top

SYSTEMS = ("hica", "hica_scan", "hica_stage2", "torch", "torch_compile")
DEFAULT_SYSTEMS = ("hica", "hica_stage2", "torch", "torch_compile")


def build(name, arch, device):
  """System name -> a step callable (blocks until the step is done)."""
  if name == "hica":
    return clip_setup.HicaRunner(arch, "clip")
  if name == "hica_scan":
    return clip_setup.HicaRunner(dataclasses.replace(arch, scan=True), "clip")
  if name == "hica_stage2":
    return clip_setup.HicaRunner(arch, "stage2")
  if name == "torch":
    return clip_setup.TorchRunner(arch, compile=False, device=device)
  if name == "torch_compile":
    return clip_setup.TorchRunner(arch, compile=True, device=device)
  raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")


def run_batch(arch, systems, rounds, warmup, device, log=print):
  """Times every system at one batch size. Returns a result dict."""
  runners, skipped, first_step = {}, {}, {}
  for name in systems:
    try:
      runner = build(name, arch, device)
      # The first step includes compilation (hica: ahead of time, in build;
      # torch.compile: in the first call).
      first_step[name] = clip_setup.timed(runner) + sum(
          getattr(runner, "compile_times", {}).values())
      runners[name] = runner
    except Exception as e:  # pylint: disable=broad-except
      skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      log(f"  {name}: skipped ({skipped[name]})")
  times, cpu = clip_setup.alternate(runners, rounds, warmup=warmup)
  result = {"batch": arch.batch, "load_average": clip_setup.load_average(),
            "systems": {}, "skipped": skipped}
  for name, ts in times.items():
    s = clip_setup.summary(ts)
    s.update(images_per_s=arch.batch / s["median"],
             first_step_s=first_step[name],
             loss_after=runners[name].loss(),
             num_params=runners[name].num_params,
             cpu_s_median=clip_setup.summary(cpu[name])["median"])
    if "torch" in times and name != "torch":
      s["speedup_vs_torch"] = clip_setup.paired_ratio(times["torch"], ts)
      s["cpu_ratio_vs_torch"] = clip_setup.paired_ratio(cpu["torch"],
                                                        cpu[name])
    result["systems"][name] = s
  return result


def _fmt(x, spec):
  return "" if x is None else format(x, spec)


def print_result(r, log=print):
  log(f"batch {r['batch']}  (load average after: {r['load_average']})")
  log(f"  {'system':<24} {'img/s':>8} {'median s':>9} {'min s':>8} "
      f"{'max s':>8} {'first s':>8} {'x torch':>8} {'cpu s':>7} "
      f"{'cpu x torch':>11}  loss")
  for name, s in r["systems"].items():
    log(f"  {name:<24} {s['images_per_s']:8.2f} {s['median']:9.3f} "
        f"{s['min']:8.3f} {s['max']:8.3f} {s['first_step_s']:8.1f} "
        f"{_fmt(s.get('speedup_vs_torch'), '.2f'):>8} "
        f"{s['cpu_s_median']:7.2f} "
        f"{_fmt(s.get('cpu_ratio_vs_torch'), '.2f'):>11}  "
        f"{s['loss_after']:.4f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawTextHelpFormatter)
  clip_setup.add_arch_args(parser)
  parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                      help=f"comma list from {SYSTEMS}")
  parser.add_argument("--batches", default="",
                      help="comma list of batch sizes (a sweep); default: "
                           "the preset's batch")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=0,
                      help="torch threads (0: the cores this process may "
                           "use; run under `taskset -c 0` for one core)")
  parser.add_argument("--device", default="auto",
                      help="torch device: auto (cuda if JAX runs on a GPU), "
                           "cpu, cuda")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args(argv)
  clip_setup.line_buffered_stdout()
  if args.tiny:
    args.rounds, args.warmup = min(args.rounds, 2), min(args.warmup, 1)
  import jax  # pylint: disable=g-import-not-at-top
  device = args.device
  if device == "auto":
    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  threads = clip_setup.set_torch_threads(args.threads or None)
  systems = [s for s in args.systems.split(",") if s]
  base = clip_setup.arch_from_args(args)
  batches = [int(b) for b in args.batches.split(",") if b] or [base.batch]
  print(f"machine: {clip_setup.machine()}; torch threads {threads}; "
        f"torch device {device}; load average {clip_setup.load_average()}")
  print(f"arch: {base}")
  results = []
  for b in batches:
    arch = dataclasses.replace(base, batch=b)
    flops = clip_setup.train_step_flops(arch)["total"]
    r = run_batch(arch, systems, args.rounds, args.warmup, device)
    r["model_flops_per_step"] = flops
    print_result(r)
    print(f"  model GFLOP/step {flops / 1e9:.1f}; achieved GFLOP/s: " + ", ".join(
        f"{n} {flops / s['median'] / 1e9:.1f}" for n, s in r["systems"].items()))
    results.append(r)
  return clip_setup.report(results, base, args.json_out,
                           torch_threads=threads)


if __name__ == "__main__":
  main()
