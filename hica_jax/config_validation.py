"""Checks a whole run config before any work (`validate`), and the built
data set against it (`validate_data`).

Every enumerated field is checked against its choices and every size and
count against its range, so a bad value fails at start with one message
listing each problem (field, value, what is allowed) instead of after a
stage has run. Choices come from the modules that consume them where those
have a constant; the rest are listed here with the consumer named.
"""
import json
import math
import re

from hica_jax.base_config import STAGES

# The optional stage after eval (config arg `study`; hica_jax/study.py).
STUDY = "study"
# The values preprocess._hflip_mode accepts (config.data.augment.hflip).
HFLIP_CHOICES = ("off", "no_laterality", "swap", False, True)
IMAGE_POOLS = ("cls", "gap", "map")             # models/vit.py ViT
IMAGE_STEMS = ("patch", "conv")                 # models/vit.py ViT
TEXT_POOLS = ("cls", "mean", "eos", "argmax", "last",
              "first")                          # models/text.py pool
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast",
               "gelu_tanh", "quick_gelu", "relu")  # models/vit.py activation
LOCAL_MODES = ("roi", "attention")              # losses.hica_loss
PHRASE_SOURCES = ("roi", "class")               # losses.hica_loss
GLOBAL_FORMS = ("softmax", "sigmoid")           # losses.hica_loss
TARGETS = ("multi_positive", "soft")            # contrastive.TARGETS
TEXT_OBJECTIVES = ("mlm", "clm")                # training/stage1.py
IMAGE_OBJECTIVES = ("deepcluster", "swav")      # training/stage1.py
INTERPRET_THRESHOLDS = ("roi_area", "top_fraction")  # interpret.py
FEATURE_NORMS = ("none", "center", "standardize")  # models/hica_model.py
PROJ_INITS = ("random", "pool_pca")  # evaluators/env.py
STAGE2_INITS = ("stage1", "model")              # workdir.plan_stages


class ConfigError(ValueError):
  """One or more config fields are invalid; the message lists each."""


class _Problems:
  """Collects 'field=value: what is allowed' lines."""

  def __init__(self, config):
    self.config, self.lines = config, []

  def get(self, field):
    node = self.config
    for part in field.split("."):
      node = node.get(part) if hasattr(node, "get") else None
      if node is None:
        return None
    return node

  def add(self, field, value, allowed):
    self.lines.append(f"config.{field}={value!r}: {allowed}")

  def choice(self, field, choices):
    value = self.get(field)
    if value is None:
      return
    if not any(value is c or (type(value) is type(c) and value == c)
               for c in choices):
      self.add(field, value, f"choose one of {list(choices)}")

  def each_choice(self, field, choices):
    """Every entry of a tuple field is one of `choices`."""
    values = tuple(self.get(field) or ())
    bad = [v for v in values if v not in choices]
    if bad:
      self.add(field, values, f"{bad} not allowed; choose entries from "
               f"{list(choices)}")

  def regexes(self, field):
    """A tuple of regular expressions (over '/'-joined param paths)."""
    values = self.get(field)
    if values is None:
      return
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
      self.add(field, values, "use a tuple of regexes over param paths, "
               "e.g. '(\"^params/image/\",)'")
      return
    for v in values:
      try:
        re.compile(v)
      except (re.error, TypeError) as e:
        self.add(field, tuple(values), f"{v!r} is not a regex ({e})")

  def number(self, field, lo=None, hi=None, integer=False, lo_open=False,
             hi_open=False, optional=False):
    """lo <= value <= hi (open ends where asked); returns the value or None."""
    value = self.get(field)
    if value is None:
      if not optional:
        self.add(field, value, "a number is required")
      return None
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if ok:
      ok = ((lo is None or (value > lo if lo_open else value >= lo)) and
            (hi is None or (value < hi if hi_open else value <= hi)))
    if not ok:
      bounds = []
      if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
      if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
      self.add(field, value, f"use {kind} {' and '.join(bounds)}".rstrip())
      return None
    return value

  def batch(self, field, data_parallel, num_processes):
    value = self.number(field, 1, integer=True)
    if value is None:
      return None
    for n, what in ((data_parallel, "data-parallel devices"),
                    (num_processes, "processes")):
      if value % n:
        self.add(field, value, f"must be divisible by the {n} {what}; use "
                 f"a multiple of {n}")
        return None
    return value


def _optim(p, prefix):
  p.number(f"{prefix}.lr", 0, lo_open=True)
  p.number(f"{prefix}.warmup_steps", 0, integer=True)
  p.number(f"{prefix}.weight_decay", 0)
  p.number(f"{prefix}.clip_norm", 0)
  p.number(f"{prefix}.b1", 0, 1, hi_open=True)
  p.number(f"{prefix}.b2", 0, 1, hi_open=True)
  p.number(f"{prefix}.eps", 0, lo_open=True)


def _stage_loop(p, stage):
  p.number(f"{stage}.steps", 1, integer=True)
  p.number(f"{stage}.ckpt_every", 0, integer=True)
  p.number(f"{stage}.log_every", 1, integer=True)
  _optim(p, f"{stage}.optim")


def _shots(p, field, values):
  for k in values:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      p.add(field, tuple(values), "every K must be an integer >= 1 (images "
            "per class of a few-shot support set)")
      return


def _data(p, c):
  from hica_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from hica_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from hica_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from hica_jax.data import real  # pylint: disable=g-import-not-at-top
  real_data = bool(p.get("data.root"))
  p.choice("data.dataset", sorted(real.BUILDERS))
  if not real_data and p.get("data.dataset") in real.BUILDERS and \
      p.get("data.dataset") not in pipeline.SYNTHETIC_FAMILY:
    p.add("data.dataset", p.get("data.dataset"), "needs data.root (a folder "
          "or CSV manifest); synthetic stand-ins exist for "
          f"{sorted(pipeline.SYNTHETIC_FAMILY)}")
  p.choice("data.normalization", ["auto"] + sorted(preprocess.NORMALIZATIONS))
  p.choice("data.augment.hflip", HFLIP_CHOICES)
  # Synthetic lesions vanish below 32 pixels (synthetic._check_params).
  p.number("data.image_size", 32 if not real_data else 1, integer=True)
  size = p.get("data.image_size")
  bound = p.get("data.stored_max_side")
  if bound is not None and (
      isinstance(bound, bool) or not isinstance(bound, int) or
      (bound != 0 and (bound < 0 or isinstance(size, int) and bound < size))):
    p.add("data.stored_max_side", bound, "use 0 (store real images at full "
          f"size) or an integer >= data.image_size ({size}): training "
          "resizes the stored image to image_size, so a smaller bound would "
          "throw away resolution")
  p.number("data.max_phrase_len", 1, integer=True)
  p.number("data.split_seed", 0, integer=True)
  p.number("data.augment.rotate", 0)
  for f in ("brightness", "contrast", "speckle"):
    p.number(f"data.augment.{f}", 0)
  scale = p.get("data.augment.crop_scale")
  if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1]
                                <= 1):
    p.add("data.augment.crop_scale", tuple(scale),
          "use (low, high) with 0 < low <= high <= 1")
  if not real_data:
    for split in ("train", "val", "test"):
      p.number(f"data.synthetic.num_{split}_per_class", 1, integer=True)
    p.number("data.synthetic.difficulty", 0, 1)
  if real_data and p.get("data.dataset") == "csv" and not p.get("data.bank"):
    p.add("data.bank", p.get("data.bank"), "data.dataset='csv' has no "
          "built-in descriptor bank: give a bank JSON file (or a built-in "
          "bank name) covering the manifest's labels")
  options = p.get("data.builder_options")
  if options:
    try:
      parsed = json.loads(options)
    except json.JSONDecodeError as e:
      parsed = e
    if not isinstance(parsed, dict):
      p.add("data.builder_options", options, "use a JSON object, e.g. "
            "'{\"val_fraction\": 0.1}'")
  del c


def _model(p):
  p.number("model.embed_dim", 1, integer=True)
  p.choice("model.dtype", ("float32", "bfloat16"))  # hica_model.DTYPES
  p.number("model.image.patch_size", 1, integer=True)
  for tower in ("image", "text"):
    for f in ("width", "depth", "heads", "mlp_dim"):
      p.number(f"model.{tower}.{f}", 1, integer=True)
    p.choice(f"model.{tower}.act", ACTIVATIONS)
    width, heads = p.get(f"model.{tower}.width"), p.get(f"model.{tower}.heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 \
        and width % heads:
      p.add(f"model.{tower}.heads", heads, f"must divide "
            f"model.{tower}.width={width}")
  p.choice("model.image.pool", IMAGE_POOLS)
  p.choice("model.image.stem", IMAGE_STEMS)
  # pylint: disable=g-import-not-at-top
  from hica_jax.models.hica_model import IMAGE_ARCHS
  from hica_jax.models.resnet import RESNET_POOLS
  p.choice("model.image.arch", IMAGE_ARCHS)
  if p.get("model.image.arch") == "resnet":
    pool = p.get("model.image.pool")
    if pool is not None and pool not in RESNET_POOLS:
      p.add("model.image.pool", pool, f"the resnet tower has no class token: "
            f"use one of {RESNET_POOLS} with model.image.arch='resnet'")
    for init in ("model.init", "model.image_init"):
      if p.get(init):
        p.add(init, p.get(init), "pretrained image weights have a ViT layout: "
              "leave it empty with model.image.arch='resnet'")
    patch = p.get("model.image.patch_size")
    if isinstance(patch, int) and patch > 0 and patch & (patch - 1):
      p.add("model.image.patch_size", patch, "model.image.arch='resnet' needs "
            "a power of two (one stride-2 stage per factor of 2)")
    depths = p.get("model.image.stage_depths")
    if (depths is not None and isinstance(patch, int) and patch > 0
        and not patch & (patch - 1)):
      stages = patch.bit_length() - 1
      if (len(depths) != stages or any(
          not isinstance(d, int) or isinstance(d, bool) or d < 0
          for d in depths)):
        p.add("model.image.stage_depths", tuple(depths), f"give {stages} "
              f"block counts >= 0, one per stage of patch_size {patch}")
  elif p.get("model.image.stage_depths") is not None:
    p.add("model.image.stage_depths", p.get("model.image.stage_depths"),
          "only the resnet tower has stages: leave it unset with "
          "model.image.arch='vit'")
  p.choice("model.text.pool", TEXT_POOLS)
  p.number("model.text.max_len", 2, integer=True)
  size, patch = p.get("data.image_size"), p.get("model.image.patch_size")
  if isinstance(size, int) and isinstance(patch, int) and 0 < size < patch:
    p.add("data.image_size", size, f"must be at least model.image.patch_size"
          f"={patch}")
  if p.get("model.image.stem") == "conv" and isinstance(patch, int) \
      and patch > 0 and patch & (patch - 1):
    p.add("model.image.patch_size", patch, "image.stem='conv' needs a "
          "power of two")


def _study(p):
  from hica_jax import evaluators  # pylint: disable=g-import-not-at-top
  from hica_jax import study as study_lib  # pylint: disable=g-import-not-at-top
  p.each_choice("study.methods", evaluators.METHODS)
  p.each_choice("study.ablations", study_lib.ABLATIONS)
  p.choice("study.interpret.threshold", INTERPRET_THRESHOLDS)
  for f in ("shots", "ablation_shots"):
    _shots(p, f"study.{f}", p.get(f"study.{f}") or ())
  for f in ("seeds", "ablation_seeds", "noise_shots", "sweep_shots"):
    p.number(f"study.{f}", 1, integer=True)
  for r in p.get("study.noise_rates") or ():
    if not (isinstance(r, (int, float)) and 0 <= r <= 1):
      p.add("study.noise_rates", tuple(p.get("study.noise_rates")),
            "every rate must be in [0, 1]")
      break
  p.number("study.interpret.top_fraction", 0, 1, lo_open=True)


def validate(config, num_devices, num_processes=1):
  """Raises ConfigError listing every invalid field of `config`.

  num_devices: devices of the run's mesh (batch sizes must split over its
  data axis, num_devices / sharding.model_axis, and over the processes).
  """
  p = _Problems(config)
  stages = tuple(p.get("stages") or ())
  p.each_choice("stages", STAGES + (STUDY,))
  if not stages:
    p.add("stages", stages, f"name at least one of {list(STAGES + (STUDY,))}")
  restart = p.get("restart") or ""
  for s in [s.strip() for s in restart.split(",") if s.strip()]:
    if s not in ("stage1", "stage2"):
      p.add("restart", restart, "a comma-separated list of stages to train "
            "anew, out of ['stage1', 'stage2']")
      break
    if s not in stages:
      p.add("restart", restart, f"{s} is restarted only when it runs: add "
            f"it to config.stages ({list(stages)})")
      break
  p.number("seed", 0, integer=True)
  _data(p, config)
  p.number("tokenizer.vocab_size", 10, integer=True)
  _model(p)

  model_axis = p.number("sharding.model_axis", 1, integer=True) or 1
  if num_devices % model_axis:
    p.add("sharding.model_axis", model_axis, f"must divide the {num_devices} "
          "devices")
    model_axis = 1
  data_parallel = max(1, num_devices // model_axis)
  from hica_jax import sharding  # pylint: disable=g-import-not-at-top
  p.choice("sharding.preset", sorted(sharding.PRESETS))
  p.number("sharding.fsdp_min_size", 0, integer=True)
  p.number("train.max_nonfinite", 0, integer=True, optional=True)

  _stage_loop(p, "stage1")
  p.batch("stage1.batch_size", data_parallel, num_processes)
  p.number("stage1.text_batch_size", 1, integer=True)
  p.number("stage1.num_clusters", 2, integer=True)
  p.number("stage1.recluster_every", 1, integer=True)
  p.number("stage1.kmeans_iters", 1, integer=True)
  p.number("stage1.embed_batch", 1, integer=True)
  p.number("stage1.mlm_rate", 0, 1, lo_open=True, hi_open=True)
  p.number("stage1.pool_fraction", 0, 1, lo_open=True)
  p.number("stage1.image_weight", 0)
  p.number("stage1.text_weight", 0)
  p.choice("stage1.text_objective", TEXT_OBJECTIVES)
  p.choice("stage1.image_objective", IMAGE_OBJECTIVES)
  for f in ("num_prototypes", "hidden", "bottleneck", "sinkhorn_iters",
            "num_local", "local_size"):
    p.number(f"stage1.swav.{f}", 0 if f == "num_local" else 1, integer=True)
  p.number("stage1.swav.num_global", 2, integer=True)
  for f in ("temperature", "sinkhorn_eps"):
    p.number(f"stage1.swav.{f}", 0, lo_open=True)
  for f in ("queue_length", "queue_start"):
    p.number(f"stage1.swav.{f}", 0, integer=True, optional=True)

  _stage_loop(p, "stage2")
  batch = p.batch("stage2.batch_size", data_parallel, num_processes)
  p.number("stage2.shots", 1, integer=True, optional=True)
  p.choice("stage2.init", STAGE2_INITS)
  p.number("stage2.freeze_for", 0, 1, optional=True)
  p.number("stage2.thaw_lr_scale", 0, lo_open=True, optional=True)
  accum = p.number("stage2.accum_steps", 1, integer=True, optional=True)
  if batch and accum and batch % (accum * data_parallel):
    p.add("stage2.accum_steps", accum, f"must divide stage2.batch_size="
          f"{batch} into equal chunks on each of the {data_parallel} data "
          f"shards; use a divisor of {batch // data_parallel}")
  for f in ("global_weight", "local_weight", "cross_weight", "beta",
            "margin"):
    p.number(f"stage2.loss.{f}", 0)
  p.choice("stage2.loss.local_mode", LOCAL_MODES)
  p.choice("stage2.loss.phrases", PHRASE_SOURCES)
  if (p.get("stage2.loss.phrases") == "class"
      and p.get("stage2.loss.local_mode") != "attention"):
    p.add("stage2.loss.phrases", "class", "class phrases have no ROI to "
          "pool under local_mode='roi'; set --config.stage2.loss.local_mode="
          "attention")
  p.choice("stage2.loss.label_aware", (True, False))
  p.choice("stage2.loss.global_form", GLOBAL_FORMS)
  p.choice("stage2.loss.targets", TARGETS)
  p.number("stage2.loss.chunk_size", 1, integer=True, optional=True)

  _shots(p, "eval.shots", p.get("eval.shots") or ())
  if not p.get("eval.shots") and "eval" in stages:
    p.add("eval.shots", p.get("eval.shots"), "name at least one K >= 1")
  for f in ("seeds", "fewshot_steps", "fewshot_min_steps", "pixel_size"):
    p.number(f"eval.{f}", 1, integer=True)
  from hica_jax import evaluators  # pylint: disable=g-import-not-at-top
  p.each_choice("eval.methods", evaluators.METHODS)
  p.number("eval.fewshot_steps_per_shot", 0, integer=True)
  for field in ("stage1.freeze", "stage2.freeze", "eval.hica_freeze"):
    p.regexes(field)
  p.choice("eval.hica_feature_norm", FEATURE_NORMS)
  p.choice("eval.hica_proj_init", PROJ_INITS)
  p.number("eval.hica_logit_scale", 0.0, hi=100.0)
  crops = p.get("eval.probe_crops") or ()
  if not all(isinstance(f, (int, float)) and not isinstance(f, bool)
             and 0.0 < f <= 1.0 for f in crops):
    p.add("eval.probe_crops", tuple(crops),
          "give side fractions in (0, 1], e.g. (0.8,); () for no crops")
  if (p.get("eval.hica_feature_norm") not in (None, "none")
      and p.get("model.image.pool") == "map"):
    p.add("eval.hica_feature_norm", p.get("eval.hica_feature_norm"),
          "it folds into ln_post, which an attention-pooled ('map') tower "
          "does not end with: use 'none' or model.image.pool='gap'")
  p.batch("eval.batch_size", data_parallel, num_processes)
  if STUDY in stages:
    _study(p)
  if p.lines:
    raise ConfigError(
        f"{len(p.lines)} invalid config value(s):\n  " + "\n  ".join(p.lines))


def largest_shots(config):
  """The largest K any configured stage asks for (0 when none does)."""
  stages = tuple(config.stages)
  ks = []
  if "stage2" in stages and config.stage2.get("shots"):
    ks.append(int(config.stage2.shots))
  if "eval" in stages:
    ks += [int(k) for k in config.eval.shots]
  if STUDY in stages:
    ks += [int(k) for k in config.study.shots]
    ks += [int(k) for k in config.study.ablation_shots]
    ks += [int(config.study.noise_shots), int(config.study.sweep_shots)]
  return max(ks, default=0)


def validate_data(config, split_counts, seen, where):
  """Fails when a seen class has no training image, or fewer than the
  largest K the config asks for, or no test image where eval runs.

  split_counts: {split: {category: images}}; seen: the stage-2 classes;
  where: the data set's folder (or name), for the message.
  """
  train = split_counts.get("train", {})
  problems = [f"class {c!r} has no training images" for c in seen
              if not train.get(c)]
  k = largest_shots(config)
  if k:
    problems += [f"class {c!r} has {train[c]} training images, fewer than "
                 f"K={k} asked for (eval.shots / stage2.shots / study)"
                 for c in seen if train.get(c) and train[c] < k]
  if "eval" in config.stages or STUDY in config.stages:
    test = split_counts.get("test", {})
    problems += [f"class {c!r} has no test images" for c in seen
                 if not test.get(c)]
  if problems:
    raise ConfigError(
        f"Data set at {where}: " + "; ".join(problems) + ". Add images to "
        "those classes' folders, or lower the K values.")


def validate_class_phrases(config, bank, seen):
  """stage2.loss.phrases='class' needs bank phrases for two seen classes:
  with one, every example of the local term is a positive of every other,
  and the term has nothing to contrast."""
  from hica_jax import study  # pylint: disable=g-import-not-at-top
  asking = []
  if config.stage2.loss.get("phrases", "roi") == "class":
    asking.append("stage2.loss.phrases='class'")
  if STUDY in config.stages:
    for spec in config.study.get("sweep", ()):
      loss = dict(config.stage2.loss,
                  **study.parse_sweep_variant(spec, config.stage2.loss).loss)
      if loss.get("phrases") != "class":
        continue
      if loss["local_mode"] != "attention":
        raise ConfigError(
            f"config.study.sweep entry {spec!r}: class phrases have no ROI "
            "to pool under local_mode='roi'; add local_mode=attention to "
            "the entry.")
      asking.append(f"config.study.sweep entry {spec!r}")
  with_phrases = [c for c in seen if bank["categories"][c].get("phrases")]
  if asking and len(with_phrases) < 2:
    raise ConfigError(
        f"{asking[0]}: the descriptor bank has local phrases for "
        f"{with_phrases or 'none'} of the classes {list(seen)}; class "
        "phrases need them for at least two. Add phrases to the bank "
        "(--config.data.bank), or drop the class phrases "
        "(--config.stage2.loss.phrases=roi, or the sweep entry).")
