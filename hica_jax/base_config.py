"""The base config every `configs/*.py` starts from.

Everything is chosen by name here and can be overridden from the command
line (`--config.stage2.loss.local_mode=attention`); the config is locked, so
a mistyped field fails at start. Config args (after ':' in --config) select
variants: "tiny" is the runlocal-style smoke mode used by the tests.
"""
import ml_collections
from ml_collections import config_dict

STAGES = ("stage1", "stage2", "eval")
# Config args (after ':' in --config, comma-separated) and what they select.
CONFIG_ARGS = {
    "tiny": "runlocal-style smoke mode (seconds; the tests use it)",
    "minilm": "the real all-MiniLM-L6-v2 as the text tower",
    "study": "adds the study stage after eval (hica_jax/study.py)",
}


# Fields added after workdirs were written, with the value that computes
# what a config without them computed. Stage records and cached cells leave
# a field out while it holds that value (`drop_neutral`), so adding such a
# field does not make every finished stage and cell stale.
NEUTRAL_ADDED_FIELDS = {"stage1.swav.queue_length": 0,
                        "stage1.swav.queue_start": 0,
                        "stage2.freeze_for": 1.0,
                        "stage2.thaw_lr_scale": 1.0,
                        "model.image.arch": "vit",
                        "eval.hica_freeze": (),
                        "model.image.stage_depths": None,
                        "eval.hica_feature_norm": "none",
                        "eval.hica_proj_init": "random",
                        "eval.hica_logit_scale": 0.0,
                        "stage1.pool_fraction": 1.0,
                        "eval.probe_crops": ()}


def is_neutral(field, value):
  """Whether dotted `field` is a NEUTRAL_ADDED_FIELD holding its neutral
  value (a sequence compares by its items: JSON reads a tuple as a list)."""
  if field not in NEUTRAL_ADDED_FIELDS:
    return False
  neutral = NEUTRAL_ADDED_FIELDS[field]
  if isinstance(neutral, tuple) and isinstance(value, (list, tuple)):
    return tuple(value) == neutral
  return value == neutral


def drop_neutral(path, value):
  """`value` (a config leaf, or a dict subtree at dotted `path`) without
  the NEUTRAL_ADDED_FIELDS that hold their neutral value."""
  if isinstance(value, dict):
    out = {}
    for key, sub in value.items():
      field = f"{path}.{key}" if path else key
      if not is_neutral(field, sub):
        out[key] = drop_neutral(field, sub)
    return out
  return value


def parse_args(arg):
  """The set of config args in `arg` ("tiny,study"); unknown ones fail."""
  args = set(a.strip() for a in (arg or "").split(",") if a.strip())
  unknown = sorted(args - set(CONFIG_ARGS))
  if unknown:
    known = ", ".join(f"{k} ({v})" for k, v in CONFIG_ARGS.items())
    raise ValueError(f"Unknown config argument(s) {unknown} after ':' in "
                     f"--config; known: {known}.")
  return args


def get_base_config(dataset, arg=None, name=None, real_stage1_steps=800):
  """Base config of a data set (configs/*.py set their own values on it).

  dataset: the real data set read from `data.root` ("kermany", "kermany3",
  "busi", "rsna", "csv"); without a root, the synthetic family of the same
  modality (pipeline.SYNTHETIC_FAMILY). name: the run's name prefix
  (default: dataset); runs go to runs/<name>_fewshot (or _study).
  real_stage1_steps: SwAV steps on real images (`config.real.stage1.steps`;
  `:tiny` replaces it with its own).
  """
  args = parse_args(arg)
  c = ml_collections.ConfigDict()
  c.name = f"{name or dataset}_fewshot"
  c.seed = 0
  c.stages = STAGES
  # Stages to train anew although the workdir holds a (finished or
  # interrupted) run of them made from other inputs, e.g. "stage2" or
  # "stage1,stage2"; their old checkpoints are moved aside, not deleted
  # (hica_jax/workdir.py).
  c.restart = ""

  c.data = ml_collections.ConfigDict()
  # A folder with a real data set; without it the built-in synthetic family.
  c.data.root = config_dict.placeholder(str)
  c.data.dataset = dataset
  c.data.bank = ""              # descriptor bank name or path; "" = data set's
  # Categories held out of both training stages and classified zero-shot
  # (the unseen-category experiment): "" none, every category is classified;
  # "bank" the bank's suggestion (the `study` arg sets it); or names, "a,b".
  c.data.unseen = ""
  c.data.data_dir = ""          # tfds data dir; "" = <workdir>/data
  c.data.split_seed = 0
  c.data.dedup = False          # drop exact duplicate images across splits
  # JSON object of builder options, e.g. '{"val_fraction": 0.1}' or, for
  # dataset="csv", '{"categories": ["a", "b"]}' (see hica_jax/data/real).
  c.data.builder_options = ""
  c.data.image_size = 64
  # Real data (data.root): images whose long side exceeds this are stored
  # downsampled to it (Lanczos, aspect kept; masks resized nearest), so
  # steps decode small PNGs; 0 keeps full size. Part of the build's
  # identity (another value builds anew); 0 or >= image_size.
  c.data.stored_max_side = 256
  # "auto": the image checkpoint's mean/std (CLIP's for CLIP); a tower
  # trained from scratch standardises each image by its own mean and std
  # ("per_image"). Others: "clip", "imagenet", "half" (0.5/0.5), "per_image".
  c.data.normalization = "auto"
  c.data.max_phrase_len = 12
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_train_per_class=150, num_val_per_class=30, num_test_per_class=60,
      # difficulty: lesion contrast, noise and class overlap
      # (hica_jax/data/synthetic.py).
      seed=0, difficulty=0.25))
  c.data.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.85, 1.0), rotate=8.0, brightness=0.05, contrast=0.1,
      speckle=0.0,
      hflip="off"))  # "off" | "no_laterality" | "swap" (left<->right in text)

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""         # a HF tokenizer folder; "" = train WordPiece
  c.tokenizer.vocab_size = 600

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 64
  c.model.image = ml_collections.ConfigDict(dict(
      image_size=c.data.get_ref("image_size"), patch_size=8, width=96,
      depth=3, heads=3, mlp_dim=192, act="gelu",
      # CLS over GAP: GAP dilutes a small lesion among 64 patches (stage 2 on
      # the full synthetic busi train split: 0.42 -> 0.59 balanced accuracy).
      pool="cls",
      # "conv": early convolutions instead of one 8x8 patch conv, the
      # locality prior a from-scratch tower needs on a few hundred images;
      # an HF image checkpoint brings its own "patch" stem.
      stem="conv",
      # "resnet": a residual conv tower with the same token grid
      # (models/resnet.py; needs pool "gap" or "map"); it ignores `stem`.
      arch="vit",
      # resnet only: blocks per stage, e.g. (0, 1, 1); None: `depth` each.
      stage_depths=config_dict.placeholder(tuple)))
  c.model.text = ml_collections.ConfigDict(dict(
      width=96, depth=2, heads=3, mlp_dim=192, max_len=24, causal=False,
      pool="mean", act="gelu"))
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.scan = False
  c.model.init = ""             # "hf:/path" initialises both towers
  c.model.image_init = ""
  c.model.text_init = ""

  def optim(lr):
    return ml_collections.ConfigDict(dict(
        lr=lr, warmup_steps=30, weight_decay=0.05, clip_norm=1.0, b1=0.9,
        b2=0.98, eps=1e-8))

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.steps = 300
  c.stage1.batch_size = 64
  c.stage1.text_batch_size = 32
  # Image pseudo-labels from clustering: "deepcluster" (k-means of the pool
  # every recluster_every steps, a linear head on the cluster ids) or "swav"
  # (online clustering against learnable prototypes on multi-crop views;
  # docs/stage1_experiments.md: on real chest X-rays its features beat
  # DeepCluster's by 0.2-0.3 balanced accuracy at K=16).
  c.stage1.image_objective = "deepcluster"
  c.stage1.swav = ml_collections.ConfigDict(dict(
      num_prototypes=64, hidden=192, bottleneck=64, temperature=0.1,
      sinkhorn_eps=0.05, sinkhorn_iters=3, num_global=2, num_local=2,
      local_size=32, global_scale=(0.5, 1.0), local_scale=(0.15, 0.5),
      rotate=10.0, hflip=0.0, speckle=0.0,
      # SwAV's queue: bottleneck embeddings of the last queue_length global
      # views join the Sinkhorn balancing from step queue_start on (0: off).
      queue_length=0, queue_start=0))
  # The share of the unlabelled pool stage 1 trains on: a seeded sample of
  # the train images, drawn without their labels (1.0: all of them). For
  # the curve of accuracy against pool size (bench/stage1_curve.py).
  c.stage1.pool_fraction = 1.0
  c.stage1.num_clusters = 12
  c.stage1.recluster_every = 100
  c.stage1.kmeans_iters = 20
  c.stage1.embed_batch = 128
  c.stage1.mlm_rate = 0.15
  c.stage1.text_objective = "mlm"   # "mlm" (bidirectional) or "clm" (causal)
  c.stage1.image_weight = 1.0
  c.stage1.text_weight = 1.0
  c.stage1.optim = optim(1e-3)
  c.stage1.freeze = ()
  c.stage1.ckpt_every = 100
  c.stage1.log_every = 10

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.steps = 300
  c.stage2.batch_size = 32
  c.stage2.shots = config_dict.placeholder(int)   # None: the whole train split
  # What stage 2 starts from: "stage1" (its finished run in this workdir; an
  # error when there is none) or "model" (the model's initialisation:
  # model.*_init or random), for a stage-2-only run.
  c.stage2.init = "stage1"
  # 2e-3 over 5e-4: few-shot cells from scratch were undertrained (synthetic
  # busi K=16: 0.38 at 5e-4/120 steps, 0.53 at 2e-3/150, 0.60 at 2e-3/300).
  c.stage2.optim = optim(2e-3)
  c.stage2.freeze = ()
  # LP-FT: the freeze holds for this fraction of a run's steps (1.0: all of
  # them); then the frozen params train, their updates scaled by
  # thaw_lr_scale (docs/decisions.md, "Few-shot freeze schedule").
  c.stage2.freeze_for = 1.0
  c.stage2.thaw_lr_scale = 1.0
  c.stage2.ckpt_every = 100
  c.stage2.log_every = 10
  # GradCache: embed the global batch in this many chunks (towers hold
  # activations of one chunk at a time); gradients equal the full batch's.
  c.stage2.accum_steps = 1
  c.stage2.loss = ml_collections.ConfigDict(dict(
      global_weight=1.0, local_weight=0.5, cross_weight=0.5, beta=0.1,
      margin=0.2, local_mode="roi", label_aware=True,
      # Who carries a local phrase: "roi" (images with an ROI, its phrase;
      # positives share the phrase) or "class" (every training image draws
      # one of its class's bank phrases; positives share the label; needs
      # local_mode="attention", and bank phrases for at least two classes).
      phrases="roi",
      # Label-aware targets of L_g: "multi_positive" (every same-class pair
      # a positive) or "soft" (Q_ij = 1[y_i = y_j] / #class in batch).
      targets="multi_positive",
      chunk_size=config_dict.placeholder(int),
      # "softmax": label-aware InfoNCE; "sigmoid": SigLIP's pairwise loss with
      # the learnt bias logit_bias (init -10, s = 10, or the checkpoint's).
      global_form="softmax"))

  # How params and optimiser state lie on the mesh (hica_jax/sharding.py).
  c.sharding = ml_collections.ConfigDict()
  c.sharding.preset = "dp"      # "dp": replicated; "fsdp": split over "data"
  c.sharding.model_axis = 1     # >1: 2-D mesh (data, model), wide layers split
  # Extra (regex over param path, spec) rules applied before the preset's;
  # spec: tuple of mesh axes / None for the trailing dims, or "fsdp".
  c.sharding.rules = ()
  c.sharding.fsdp_min_size = 2**12   # params with fewer elements stay whole

  c.train = ml_collections.ConfigDict()
  # Consecutive non-finite steps (updates skipped) before training stops
  # with an error; 0 never stops.
  c.train.max_nonfinite = 10

  # The eval stage: evaluators chosen by name (hica_jax/evaluators), each
  # on the same class-balanced support sets of eval.shots x eval.seeds.
  c.eval = ml_collections.ConfigDict()
  c.eval.methods = ("zero_shot", "hica", "linear_probe", "zs_linear_probe",
                    "tip_adapter", "pixel_probe")
  c.eval.shots = (1, 4, 16)
  c.eval.seeds = 3
  # The one step rule of every few-shot training run (HiCA, global-only,
  # supervised CE; eval stage and study alike): fewshot_steps_per_shot * K
  # within [fewshot_min_steps, fewshot_steps] (evaluators/env.fewshot_steps).
  c.eval.fewshot_steps = 200
  c.eval.fewshot_steps_per_shot = 20
  c.eval.fewshot_min_steps = 50
  # Regexes over param paths added to stage2.freeze (under its schedule) in
  # the few-shot runs of HiCA's objective: hica, global_only, the ablations,
  # noise and sweep cells, each from stage 1's image tower (no_stage1 and
  # sweep entries that start the image tower at random train it). Supervised
  # CE and the stage-2 model keep stage2.freeze alone.
  c.eval.hica_freeze = ()
  # In those same runs: 'center' or 'standardize' the image tower's features
  # (pooled and tokens) per feature by their mean (and std) over the
  # unlabelled train pool before image_proj, folded into ln_post's bias and
  # scale ('none': as stage 1 left them). Meant with the tower held: the
  # linear probe's standardisation, given to HiCA's projection.
  c.eval.hica_feature_norm = "none"
  # In those same runs, where image_proj starts: 'random' (its
  # initialisation: stage 1 never trains it) or 'pool_pca' (the top
  # embed_dim principal directions of the pool's features as image_proj
  # sees them, after hica_feature_norm; needs embed_dim <= the features).
  c.eval.hica_proj_init = "random"
  # In those same runs: the logit scale s held at this value (its param
  # frozen at log s) instead of starting at stage 1's and training; 0.0
  # keeps stage 1's, trained. A small s keeps the support set's loss from
  # reaching zero within the run: a stronger pull towards the class means.
  c.eval.hica_logit_scale = 0.0
  # Test-time crops for the readouts fitted on frozen stage-1 features
  # (linear_probe, zs_linear_probe, tip_adapter, the all-label probe):
  # side fractions f, each giving five views of every image they read
  # (four corners and the centre, f of the side, resized back), whose
  # features are averaged with the full image's; () for the full image
  # alone. Prototype classifiers (zero-shot, HiCA, the stage-2 model) and
  # supervised CE embed images whole: averaged embeddings moved the
  # stage-2 model's decision threshold (docs/decisions.md, "Test-time
  # crops for the frozen-feature readouts").
  c.eval.probe_crops = ()
  # Images per forward pass when embedding support and test sets.
  c.eval.batch_size = 64
  # The raw-pixel floor (pixel_probe): pixels per side after downsampling.
  c.eval.pixel_size = 32

  # The study (config arg "study"; hica_jax/study.py): the eval stage's
  # cells (<workdir>/cells) over a wider grid, plus its own sections. Its
  # cost is the few-shot training runs (hica, global_only and supervised_ce
  # at 5 K x `seeds`; 4 ablations, 3 noise rates and the sweep x
  # `ablation_seeds` at K=16) times the step time (report:
  # efficiency.train_step).
  c.study = ml_collections.ConfigDict()
  c.study.shots = (1, 2, 4, 8, 16)
  c.study.seeds = 5
  c.study.ablation_seeds = 3    # ablations, noise rates, sweep (budget)
  c.study.methods = ("zero_shot", "hica", "global_only", "linear_probe",
                     "zs_linear_probe", "tip_adapter", "supervised_ce",
                     "pixel_probe")
  c.study.ablations = ("no_stage1", "no_global", "no_local", "no_cross")
  c.study.ablation_shots = (16,)
  c.study.noise_rates = (0.0, 0.1, 0.3, 0.5)
  c.study.noise_shots = 16
  # The investigation of HiCA against its baselines: HiCA at sweep_shots
  # with each entry's overrides (study.parse_sweep_variant: stage2.loss
  # fields, logit_scale, init), x `ablation_seeds`, as paired differences.
  c.study.sweep = ("cross_weight=1.0", "local_weight=1.0",
                   "local_mode=attention", "logit_scale=50",
                   "init=image_stage1", "init=text_stage1")
  c.study.sweep_shots = 16
  c.study.interpret = ml_collections.ConfigDict(dict(
      # IoU of the map's top pixels with the ROI: as many pixels as the ROI
      # ("roi_area") or a fixed `top_fraction` of the image ("top_fraction").
      threshold="roi_area", top_fraction=0.2,
      gallery=6, random_draws=20))
  c.study.efficiency = ml_collections.ConfigDict(dict(
      warmup_steps=3, timed_steps=10))

  # What changes when data.root points at real images: `resolve_real_defaults`
  # sets each leaf below at start, unless that field was given on the command
  # line; synthetic runs keep the values above. Evidence for each value:
  # docs/decisions.md ("Real-image defaults").
  c.real = ml_collections.ConfigDict()
  # Real runs default to their own workdir, runs/<name>_real.
  c.real.name = c.name + "_real"
  # Every category is classified (the study's unseen-category experiment is
  # then empty; ask for it with --config.data.unseen=bank or names).
  c.real.data = ml_collections.ConfigDict(dict(unseen=""))
  c.real.stage1 = ml_collections.ConfigDict(dict(
      # DeepCluster's features are below a random tower on real chest X-rays;
      # SwAV's beat it by 0.2-0.3 at K=16 (docs/stage1_experiments.md).
      image_objective="swav", steps=real_stage1_steps))
  c.real.stage1.optim = ml_collections.ConfigDict(dict(
      warmup_steps=50, weight_decay=0.04))
  # The text tower (not its projection) keeps its stage-1 weights in stage 2
  # and every few-shot run: over three stage-1 runs HiCA K=16 kept its mean
  # on Kermany with a fifth of the spread and gained 0.026 on BUSI
  # (docs/decisions.md, "Text tower frozen in stage 2 on real images").
  c.real.stage2 = ml_collections.ConfigDict(dict(freeze=("^params/text/",)))
  # The study on real images (about an hour on 2 cores): 5 seeds everywhere,
  # the ablations that a data set without masks can tell apart, two noise
  # rates, and sweep entries that can move something on real data without
  # masks (a local term cannot: there `local_mode=attention` was +0.000).
  c.real.study = ml_collections.ConfigDict(dict(
      shots=(1, 4, 16), seeds=5, ablation_seeds=5,
      ablations=("no_stage1", "no_global", "no_cross"),
      noise_rates=(0.0, 0.3),
      sweep=("global_form=sigmoid", "cross_weight=1.0", "init=image_stage1")))

  if "minilm" in args:
    # The real all-MiniLM-L6-v2 (extra `pretrained`) as the text tower; its
    # architecture and tokenizer come from the checkpoint.
    c.model.text_init = "hf:all-minilm-l6-v2"
  if "tiny" in args:
    # runlocal-style: seconds, for tests and smoke checks.
    c.data.image_size = 32
    c.data.synthetic.update(dict(num_train_per_class=12, num_val_per_class=2,
                                 num_test_per_class=6))
    c.model.image.update(dict(patch_size=8, width=32, depth=1, heads=2,
                              mlp_dim=64))
    c.model.text.update(dict(width=32, depth=1, heads=2, mlp_dim=64,
                             max_len=16))
    c.model.embed_dim = 32
    c.tokenizer.vocab_size = 300
    c.stage1.swav.update(dict(num_prototypes=8, hidden=32, bottleneck=16,
                              local_size=16))
    c.stage1.update(dict(steps=6, batch_size=16, text_batch_size=8,
                         num_clusters=4, recluster_every=3, kmeans_iters=5,
                         ckpt_every=3, log_every=2, embed_batch=32))
    c.stage2.update(dict(steps=6, batch_size=16, ckpt_every=3, log_every=2))
    c.eval.update(dict(shots=(1, 2), seeds=2, fewshot_steps=3, batch_size=32,
                       pixel_size=8))
    c.study.update(dict(shots=(1, 2), seeds=2, ablation_shots=(2,),
                        noise_rates=(0.0, 0.5), noise_shots=2,
                        sweep=("cross_weight=1.0,logit_scale=30",
                               "init=text_stage1"), sweep_shots=2))
    c.study.interpret.update(dict(gallery=3, random_draws=3))
    c.study.efficiency.update(dict(warmup_steps=1, timed_steps=2))
    # Real folders in tests: the real-image choices at :tiny's sizes.
    c.real.stage1.steps = c.stage1.steps
    c.real.study.update(dict(shots=c.study.shots, seeds=c.study.seeds,
                             ablation_seeds=c.study.ablation_seeds,
                             sweep=c.study.sweep))
  if "study" in args:
    # The paper's evaluation in one command (hica_jax/study.py).
    c.name = f"{name or dataset}_study"
    c.real.name = c.name + "_real"
    c.data.unseen = "bank"
    c.stages = STAGES + ("study",)
  return c


def real_default_fields(real, prefix=""):
  """{dotted config field: value} of the leaves of config.real."""
  out = {}
  for key, value in real.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(real_default_fields(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def field_parent(config, field):
  """(ConfigDict holding the dotted `field`, its last name), or (None, name)
  when the config has no such field."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    return None, leaf
  return node, leaf


# config.real fields (dotted prefixes) that a command line naming
# model.image.arch, or a pretrained image tower, keeps off.
ARCH_BOUND_FIELDS = ("model.image.", "eval.hica_freeze",
                     "eval.hica_feature_norm", "eval.hica_logit_scale")


def resolve_real_defaults(config, explicit=()):
  """Sets config.real's values when config.data.root is set; returns them.

  explicit: dotted fields given on the command line (they win; naming
  model.image.arch or a pretrained model.init / model.image_init keeps the
  ARCH_BOUND_FIELDS off). Idempotent: a resumed
  run resolves to the same config. Fails naming `config.real.<f>`
  when <f> is not a field of the config.
  """
  if not config.data.get("root"):
    return {}
  explicit = set(explicit)
  # A tower's shape and whether HiCA holds it come with its architecture: a
  # command line that names model.image.arch, or a checkpoint that brings
  # the image tower (model.init, model.image_init), gets none of
  # config.real's model.image fields nor its eval.hica_freeze.
  arch_given = ("model.image.arch" in explicit
                or bool(config.model.get("init"))
                or bool(config.model.get("image_init")))
  applied = {}
  for field, value in real_default_fields(config.real).items():
    node, leaf = field_parent(config, field)
    if node is None:
      raise ValueError(f"config.real.{field}: config has no field {field}; "
                       "config.real mirrors the config's own fields.")
    if (field in explicit or node[leaf] == value
        or (arch_given and field.startswith(ARCH_BOUND_FIELDS))):
      continue
    node[leaf] = value
    applied[field] = value
  return applied
