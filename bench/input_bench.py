r"""Input pipeline throughput against what the default train steps consume.

  python bench/input_bench.py [--family busi] [--workers 0,2] [--threads 1,4]
      [--batch_sizes 32,64] [--batches 40] [--train_steps 10] [--rounds 3]
      [--bench_dir /tmp/hica_input_bench] [--json_out results.json]
      [--data_root DIR --dataset kermany [--stored_max_side 256,0]
       [--fullsize_count 300 --fullsize_side 2000 [--copy_only]]
       [--cost_records 200]]

With `--data_root`, the real data set `--dataset` in that folder replaces the
synthetic one, built once per `--stored_max_side` (config.data
.stored_max_side; build seconds and on-disk MB are reported, each build
fresh in its own data dir) and measured as below. `--fullsize_count N`
first writes a Kermany-layout folder of N images of the root (train and
test in proportion, patients kept apart as the root keeps them) upsampled
to a long side of `--fullsize_side` px, grayscale JPEG quality 95: the
decode cost of full-size X-rays, not their content. Up to twice the root's
count: past it every image comes once more, mirrored (`-mirror` in its
name, its patient's prefix kept), so the build's duplicate check keeps it
(the full Kermany training set is 5216 images). `--copy_only` writes the
copy under --bench_dir and stops: a folder for timing the README command
on full-size images.

With the default config of `--family` (64 px synthetic data, the family's
augmentation, descriptor sentences, tokenised phrases):
1. CPU ms per image of each preprocessing stage (read, decode, augment),
   single-threaded: the machine's load hardly changes them, and they size
   the workers a faster step needs;
2. pipeline images/s for every (grain worker processes, loader threads,
   batch size): `pipeline.train_dataset(..., num_threads, worker_count)`,
   timed after the first batch (worker start-up is reported apart; without
   workers also the process CPU ms per image);
3. what the default train steps consume: stage-2 (batch stage2.batch_size)
   and stage-1 (batch stage1.batch_size) steps/s on a fixed batch times the
   batch, on this machine's JAX devices (`--train_steps 0` skips them;
   `--step_images_per_s` then states the consumption);
4. end to end: the stage-2 step fed by the pipeline (no workers, the most
   threads) against the same step on a fixed batch, in alternating rounds
   (per build with --data_root).
The pipeline is the bottleneck when its images/s is below what the steps
consume; then the fed step runs at the pipeline's rate. On a CPU-only host
the pipeline and the step also share the cores, so the fed step is slower by
the pipeline's CPU share even when the pipeline keeps up.
"""
import dataclasses
import glob
import json
import os
import shutil
import time

from absl import app
from absl import flags
import jax
import numpy as np

_FAMILY = flags.DEFINE_enum("family", "busi", ["busi", "chestxray"],
                            "Synthetic family whose default config is used.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker processes.")
_THREADS = flags.DEFINE_list("threads", ["1", "4"], "Loader threads.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "64"],
                                 "Global batch sizes of the pipeline runs.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches per run.")
_TRAIN_STEPS = flags.DEFINE_integer(
    "train_steps", 10, "Timed train steps per round (0: skip the steps).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Alternating fixed-batch / pipeline-fed stage-2 rounds.")
_STEP_RATE = flags.DEFINE_float(
    "step_images_per_s", None, "Train-step consumption to compare with when "
    "--train_steps=0 (images/s).")
_BENCH_DIR = flags.DEFINE_string("bench_dir", "/tmp/hica_input_bench",
                                 "Data, tokenizer and XLA cache live here.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write results here.")
_DATA_ROOT = flags.DEFINE_string(
    "data_root", None, "A real data set folder instead of the synthetic one.")
_DATASET = flags.DEFINE_string("dataset", "kermany",
                               "config.data.dataset of --data_root.")
_STORED_MAX_SIDE = flags.DEFINE_list(
    "stored_max_side", ["256", "0"], "config.data.stored_max_side of each "
    "build of --data_root (0: full size).")
_FULLSIZE_COUNT = flags.DEFINE_integer(
    "fullsize_count", 0, "Bench on this many images of --data_root (Kermany "
    "layout) upsampled to --fullsize_side (0: the root as it is).")
_COPY_ONLY = flags.DEFINE_bool(
    "copy_only", False, "Write the --fullsize_count copy and stop.")
_FULLSIZE_SIDE = flags.DEFINE_integer(
    "fullsize_side", 2000, "Long side (px) of the upsampled copies.")
_COST_RECORDS = flags.DEFINE_integer(
    "cost_records", 200, "Records timed per preprocessing stage.")


def context(family, bench_dir, data=None):
  """configs/<family>_fewshot.py's default data set (or the real one of
  `data`, {config.data field: value}), tokenizer, model and tables."""
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import testing  # pylint: disable=g-import-not-at-top
  config = testing.config(family, None)
  config.data.update(data or {})
  return context_lib.build_context(config, bench_dir)


def write_fullsize_copy(root, out, count, side):
  """Kermany-layout folder `out` of `count` images of `root` (its train/ and
  test/ in proportion, evenly spaced in name order), each upsampled
  (bicubic) to a long side of `side` px and saved as grayscale JPEG quality
  95. Past the root's count (up to twice it) every image is written once
  more, mirrored left to right, as `<name>-mirror<ext>`. Returns (out, MB
  of the files); an existing complete copy is reused."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top
  paths = sorted(p for p in glob.glob(os.path.join(root, "*", "*", "*"))
                 if os.path.splitext(p)[1].lower() in (".jpeg", ".jpg",
                                                        ".png"))
  if not paths:
    raise FileNotFoundError(f"--data_root={root}: no <split>/<CLASS>/<image> "
                            "files (the Kermany layout) to upsample.")
  if count > 2 * len(paths):
    raise ValueError(f"--fullsize_count={count}: at most twice the "
                     f"{len(paths)} images of {root} (each once as it is, "
                     "once mirrored).")
  def spaced(n):
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n)
            .round().astype(int)]
  picked = [(p, False) for p in spaced(min(count, len(paths)))]
  picked += [(p, True) for p in spaced(max(0, count - len(paths)))]
  done = os.path.join(out, ".complete")
  if not os.path.exists(done):
    shutil.rmtree(out, ignore_errors=True)
    for p, mirrored in picked:
      rel = os.path.relpath(p, root)
      if mirrored:
        stem, ext = os.path.splitext(rel)
        rel = f"{stem}-mirror{ext}"
      dest = os.path.join(out, rel)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      with Image.open(p) as img:
        img = img.convert("L")
        if mirrored:
          img = ImageOps.mirror(img)
        scale = side / max(img.size)
        size = tuple(max(1, round(n * scale)) for n in img.size)
        img.resize(size, Image.BICUBIC).save(dest, format="JPEG", quality=95)
    open(done, "w").close()
  mb = sum(os.path.getsize(p) for p in glob.glob(
      os.path.join(out, "*", "*", "*"))) / 2**20
  return out, mb


def timed_build(dataset, root, data_dir, stored_max_side):
  """Builds `dataset` afresh into `data_dir` (deleted first) as a run's
  open_dataset would; returns {build seconds, on-disk MB, images,
  downsampled, stored max h/w}."""
  from hica_jax.data import real  # pylint: disable=g-import-not-at-top
  shutil.rmtree(data_dir, ignore_errors=True)
  t0 = time.perf_counter()
  builder, summary = real.build_dataset(dataset, root, data_dir,
                                        stored_max_side=stored_max_side)
  seconds = time.perf_counter() - t0
  written = [os.path.join(d, f) for d, _, fs in
             os.walk(os.fspath(builder.data_dir)) for f in fs]
  return {"build_s": seconds,
          "disk_mb": sum(os.path.getsize(p) for p in written) / 2**20,
          "images": summary["images"],
          "downsampled": summary["stored"]["downsampled"],
          "stored_max_hw": summary["stored"]["max_hw"],
          "source_max_hw": summary["sizes"]["max_hw"]}


def pipeline_rate(ctx, batch_size, workers, threads, batches):
  """(images/s after the first batch, seconds to the first batch, CPU ms per
  image in this process)."""
  from hica_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = ctx.data.source("train")
  pool = source.indices_of(ctx.class_ids(ctx.data.seen))
  ds = pipeline.train_dataset(source, pool, ctx.preprocessor(), batch_size,
                              batches + 1, seed=0, num_threads=threads,
                              worker_count=workers, process_index=0,
                              process_count=1)
  it = iter(ds)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  n = sum(1 for _ in it) * batch_size
  rate = n / (time.perf_counter() - t0)
  # CPU time of this process per image: load-independent, but it only sees
  # the work done here (not in worker processes).
  cpu_ms = 1e3 * (time.process_time() - c0) / n if not workers else None
  it.close()
  return rate, first, cpu_ms


def stage_costs(ctx, n=200):
  """CPU ms per image of each preprocessing stage (one thread, no workers).

  Augmentation is timed on images already resized to data.image_size, as
  the preprocessor applies it (a no-op resize for the synthetic data)."""
  from hica_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  source = ctx.data.source("train")
  pool = [int(i) for i in source.indices_of(ctx.class_ids(ctx.data.seen))[:n]]
  pre = ctx.preprocessor()
  aug = dict(ctx.config.data.augment)
  size = ctx.config.data.image_size
  records = [source[i] for i in pool]
  decoded = [(preprocess.decode_image(r["image"]),
              preprocess.decode_mask(r["mask"])) for r in records]
  resized = [preprocess.resize_and_pad(im, mk, size) for im, mk in decoded]
  images, masks = [im for im, _ in resized], [mk for _, mk in resized]
  rng = lambda i: np.random.default_rng([0, 1, i])
  stages = {
      "read record (tfds)": lambda: [source[i] for i in pool],
      "decode image": lambda: [preprocess.decode_image(r["image"])
                               for r in records],
      "decode mask": lambda: [preprocess.decode_mask(r["mask"])
                              for r in records],
      "resize to image_size": lambda: [
          preprocess.resize_and_pad(im, mk, size) for im, mk in decoded],
      "augment": lambda: [preprocess.augment(im, mk, rng(i), aug)
                          for i, (im, mk) in enumerate(zip(images, masks))],
      "augment without speckle": lambda: [
          preprocess.augment(im, mk, rng(i), dict(aug, speckle=0.0))
          for i, (im, mk) in enumerate(zip(images, masks))],
      # A fresh Preprocessor each round: its first pass over a record.
      "whole preprocess (no read)": lambda: [
          p(r, rng=rng(i), index=i) for p in [dataclasses.replace(pre)]
          for i, r in enumerate(records)],
      # `pre` has seen every record: its decoded pixels come from its cache.
      "whole preprocess, pixels cached (no read)": lambda: [
          pre(r, rng=rng(i), index=i) for i, r in enumerate(records)],
  }
  for i, r in enumerate(records):
    pre(r, rng=rng(i), index=i)
  out = {}
  for name, fn in stages.items():
    best = float("inf")
    for _ in range(3):
      c0 = time.process_time()
      fn()
      best = min(best, time.process_time() - c0)
    out[name] = 1e3 * best / len(pool)
  return out


def _batches(ctx, batch_size, steps, threads=4):
  from hica_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = ctx.data.source("train")
  pool = source.indices_of(ctx.class_ids(ctx.data.seen))
  return iter(pipeline.train_dataset(
      source, pool, ctx.preprocessor(), batch_size, steps, seed=0,
      num_threads=threads, process_index=0, process_count=1))


def _time_steps(run_step, state, feed, steps):
  """Steps/s of `run_step` over `steps` steps, after two warm-up steps."""
  for _ in range(2):
    state, metrics = run_step(state, feed())
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = run_step(state, feed())
  jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - t0), state


def stage2_rates(ctx, steps, feed_threads, rounds=3):
  """(fixed-batch steps/s, pipeline-fed steps/s) of the default stage 2,
  medians of `rounds` alternating rounds of `steps` steps."""
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import sharding  # pylint: disable=g-import-not-at-top
  from hica_jax.training import stage2  # pylint: disable=g-import-not-at-top
  s2, mesh = ctx.config.stage2, ctx.mesh
  state, step_fn, _ = stage2.setup(
      ctx, context_lib.init_params(ctx, jax.random.PRNGKey(0)), s2.steps)
  desc = ctx.desc_arrays()
  lr = np.float32(1e-4)
  run = lambda st, b: step_fn(st, b, desc, lr)
  fixed = sharding.shard_batch(next(_batches(ctx, s2.batch_size, 1)), mesh)
  # Alternating rounds, medians: the machine's load drifts between rounds.
  it = _batches(ctx, s2.batch_size, rounds * (steps + 2), threads=feed_threads)
  fixed_rates, fed_rates = [], []
  for _ in range(rounds):
    rate, state = _time_steps(run, state, lambda: fixed, steps)
    fixed_rates.append(rate)
    rate, state = _time_steps(
        run, state, lambda: sharding.shard_batch(next(it), mesh), steps)
    fed_rates.append(rate)
  return float(np.median(fixed_rates)), float(np.median(fed_rates))


def stage1_rate(ctx, steps):
  """Fixed-batch steps/s of the default stage-1 step (cluster CE + MLM),
  its state built as stage1.run builds it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import sharding  # pylint: disable=g-import-not-at-top
  from hica_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from hica_jax.data import text_tables  # pylint: disable=g-import-not-at-top
  from hica_jax.training import loop  # pylint: disable=g-import-not-at-top
  from hica_jax.training import stage1  # pylint: disable=g-import-not-at-top
  s1, mesh, model = ctx.config.stage1, ctx.mesh, ctx.model
  key = jax.random.PRNGKey(0)
  size = ctx.config.data.image_size
  params = {"model": context_lib.init_params(ctx, key)}
  width = model.apply(params["model"], jnp.zeros((1, size, size, 3)),
                      method=model.image_features).shape[-1]
  params["cluster_head"] = loop.linear_head_init(key, width, s1.num_clusters)
  tx, _ = loop.make_optimizer(s1.optim, s1.steps, **loop.freeze_args(s1))
  n = len(ctx.data.source("train"))
  pseudo = np.arange(n, dtype=np.int32) % s1.num_clusters
  state = loop.create_state(params, tx, mesh,
                            pseudo_labels=sharding.replicate(pseudo, mesh),
                            param_shardings=ctx.param_shardings(params))
  special = tokenizer_lib.special_ids(ctx.tokenizer)
  step_fn = stage1.make_stage1_step(
      model, tx, s1, tuple(special["all_special"]),
      tokenizer_lib.vocab_size(ctx.tokenizer), special["mask"] or 0,
      mesh=mesh, state_sharding=loop.state_shardings(state))
  ids, mask = tokenizer_lib.tokenize(
      ctx.tokenizer,
      text_tables.text_corpus(ctx.data.bank)[:s1.text_batch_size],
      ctx.model_config.text.max_len)
  text = sharding.replicate({"ids": ids, "mask": mask}, mesh)
  fixed = sharding.shard_batch(next(_batches(ctx, s1.batch_size, 1)), mesh)
  lr = np.float32(1e-4)
  run = lambda st, b: step_fn(st, b, text, key, lr)
  rate, _ = _time_steps(run, state, lambda: fixed, steps)
  return rate


def measure_pipeline(ctx, out):
  """Stage costs and pipeline rates of `ctx`'s data into `out` (printed)."""
  out["stage_cpu_ms_per_image"] = stage_costs(ctx, _COST_RECORDS.value)
  for name, ms in out["stage_cpu_ms_per_image"].items():
    print(f"{name:28s} {ms:.3f} CPU ms/image")
  out["pipeline"] = []
  for batch in map(int, _BATCH_SIZES.value):
    for workers in map(int, _WORKERS.value):
      for threads in map(int, _THREADS.value):
        rate, first, cpu_ms = pipeline_rate(ctx, batch, workers, threads,
                                            _BATCHES.value)
        out["pipeline"].append(dict(batch=batch, workers=workers,
                                    threads=threads, images_per_s=rate,
                                    first_batch_s=first,
                                    cpu_ms_per_image=cpu_ms))
        cpu = f", {cpu_ms:.2f} CPU ms/image" if cpu_ms else ""
        print(f"pipeline batch {batch:3d} workers {workers} threads "
              f"{threads}: {rate:7.0f} images/s (first batch {first:.2f} s"
              f"{cpu})")


def measure_stage2_fed(ctx, out):
  """Stage-2 steps/s on a fixed batch and fed by the pipeline, into `out`."""
  cfg = ctx.config
  threads = max(map(int, _THREADS.value))
  fixed, fed = stage2_rates(ctx, _TRAIN_STEPS.value, threads, _ROUNDS.value)
  out["stage2"] = dict(batch=cfg.stage2.batch_size, steps_per_s=fixed,
                       images_per_s=fixed * cfg.stage2.batch_size,
                       fed_steps_per_s=fed, fed_threads=threads)
  print(f"stage2 step (batch {cfg.stage2.batch_size}): {fixed:.2f} steps/s "
        f"= {fixed * cfg.stage2.batch_size:.0f} images/s on a fixed batch; "
        f"{fed:.2f} steps/s fed by the pipeline (workers 0, threads "
        f"{threads}): {abs(100 * (1 - fed / fixed)):.0f}% "
        f"{'slower' if fed < fixed else 'faster'}")


def compare(out, need):
  best = {}
  for r in out["pipeline"]:
    best[r["workers"]] = max(best.get(r["workers"], 0), r["images_per_s"])
  for workers, rate in sorted(best.items()):
    print(f"workers {workers}: best {rate:.0f} images/s = {rate / need:.1f}x "
          f"the train steps' {need:.0f} images/s")


def fullsize_copy(bench_dir):
  """write_fullsize_copy of --data_root under `bench_dir`, announced."""
  count, side = _FULLSIZE_COUNT.value, _FULLSIZE_SIDE.value
  out, mb = write_fullsize_copy(
      _DATA_ROOT.value, os.path.join(bench_dir, f"fullsize_{count}_{side}"),
      count, side)
  print(f"{count} images upsampled to a long side of {side} px: {mb:.0f} MB "
        f"of JPEG in {out}")
  return out, mb


def real_builds(bench_dir):
  """[(stored_max_side, {config.data fields}, build stats)] of --data_root,
  each built afresh."""
  root, source_mb = _DATA_ROOT.value, None
  if _FULLSIZE_COUNT.value:
    root, source_mb = fullsize_copy(bench_dir)
  out = []
  for bound in map(int, _STORED_MAX_SIDE.value):
    data_dir = os.path.join(bench_dir, f"data_stored{bound}")
    stats = timed_build(_DATASET.value, root, data_dir, bound)
    stats.update(stored_max_side=bound, source_mb=source_mb, root=root)
    print(f"build stored_max_side={bound}: {stats['build_s']:.1f} s, "
          f"{stats['disk_mb']:.1f} MB on disk, {stats['images']} images "
          f"({stats['downsampled']} downsampled; source max "
          f"{stats['source_max_hw']}, stored max {stats['stored_max_hw']})")
    out.append((bound, dict(root=root, dataset=_DATASET.value,
                            stored_max_side=bound, data_dir=data_dir), stats))
  return out


def main(argv):
  del argv
  os.makedirs(_BENCH_DIR.value, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(_BENCH_DIR.value, "xla"))
  if _COPY_ONLY.value:
    if not (_DATA_ROOT.value and _FULLSIZE_COUNT.value):
      raise app.UsageError("--copy_only needs --data_root and "
                           "--fullsize_count.")
    fullsize_copy(_BENCH_DIR.value)
    return
  builds = (real_builds(_BENCH_DIR.value) if _DATA_ROOT.value
            else [(None, None, None)])
  out = {"family": _FAMILY.value, "cpu_count": os.cpu_count(),
         "devices": [str(d) for d in jax.devices()], "builds": []}
  ctx = None
  for bound, data, stats in builds:
    ctx = context(_FAMILY.value, _BENCH_DIR.value, data)
    cfg = ctx.config
    out.update(image_size=cfg.data.image_size,
               augment=dict(cfg.data.augment))
    build = dict(stats or {}, dataset=ctx.data.name)
    print(f"{ctx.data.name}"
          f"{'' if bound is None else f' stored_max_side={bound}'}: "
          f"{cfg.data.image_size}px, augment {dict(cfg.data.augment)}, "
          f"{os.cpu_count()} CPUs, devices {jax.devices()}")
    measure_pipeline(ctx, build)
    if _TRAIN_STEPS.value:
      measure_stage2_fed(ctx, build)
    out["builds"].append(build)
  if _TRAIN_STEPS.value:
    cfg = ctx.config
    s1 = stage1_rate(ctx, _TRAIN_STEPS.value)
    out["stage1"] = dict(batch=cfg.stage1.batch_size, steps_per_s=s1,
                         images_per_s=s1 * cfg.stage1.batch_size)
    print(f"stage1 step (batch {cfg.stage1.batch_size}): {s1:.2f} steps/s = "
          f"{s1 * cfg.stage1.batch_size:.0f} images/s on a fixed batch")
    need = max(max(b["stage2"]["images_per_s"] for b in out["builds"]),
               out["stage1"]["images_per_s"])
  else:
    need = _STEP_RATE.value
  if need:
    for build in out["builds"]:
      print(f"{build['dataset']} stored_max_side="
            f"{build.get('stored_max_side', '-')}:")
      compare(build, need)
    out["needed_images_per_s"] = need
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
