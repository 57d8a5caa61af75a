"""Shared set-up of the train-step benchmarks (train_step.py, mfu.py, profile_step.py).

One CLIP-equivalent dual encoder, built twice with the same architecture:
- hica-jax: `hica_jax.models.build_model` (ViT + pre-LN causal text tower,
  CLS / EOS pooling, bias-free projections) trained by the project's stage-2
  step, `hica_jax.testing.stage2_trainer` (`training.stage2.make_stage2_step`,
  `training.loop.make_optimizer`: clip by global norm 1, AdamW, decay on
  matrices only) with only the global term and no labels (plain CLIP
  InfoNCE), which makes one image and one text pass (see `HicaRunner`);
- PyTorch: transformers' `CLIPModel(return_loss=True)` with the same config,
  `torch.optim.AdamW` with the same decay mask and the same global-norm clip.

Both do forward + backward + clip + AdamW on one batch per step. Presets:
`cpu` (the 2-core CPU reference point), `gpu` (ViT-B/16 + 12-layer text,
bf16) and `tiny` (tests).
"""
import dataclasses
import os
import statistics
import sys
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Arch:
  """Both towers' architecture and the step's shapes."""
  image_size: int = 96
  patch: int = 8
  width: int = 256
  depth: int = 6
  heads: int = 4
  mlp: int = 1024
  text_width: int = 256
  text_depth: int = 4
  text_heads: int = 4
  text_mlp: int = 1024
  text_len: int = 77
  vocab: int = 49408
  embed_dim: int = 256
  batch: int = 64
  act: str = "gelu"          # hica-jax's default config uses exact GELU
  dtype: str = "float32"     # "bfloat16": hica compute dtype / torch autocast
  scan: bool = False
  remat: bool = False

  @property
  def patches(self):
    return (self.image_size // self.patch) ** 2


PRESETS = {
    # The reference point on the 2-core CPU (BENCHMARKS.md).
    "cpu": Arch(),
    # ViT-B/16 image tower and CLIP's 12-layer text tower, bf16.
    "gpu": Arch(image_size=224, patch=16, width=768, depth=12, heads=12,
                mlp=3072, text_width=512, text_depth=12, text_heads=8,
                text_mlp=2048, embed_dim=512, batch=128, dtype="bfloat16"),
    # Seconds on CPU, for the smoke tests; the CPU preset's widths, so that
    # matmuls still dominate the FLOPs (XLA's count within a few % of ours).
    "tiny": Arch(image_size=32, patch=8, depth=1, text_depth=1, text_len=16,
                 vocab=512, embed_dim=64, batch=8),
}


def preset(name, tiny=False, **overrides):
  """The named preset; `tiny` shrinks any preset to seconds (dtype kept)."""
  arch = PRESETS["tiny" if tiny else name]
  if tiny and name in PRESETS:
    arch = dataclasses.replace(arch, dtype=PRESETS[name].dtype)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  return dataclasses.replace(arch, **overrides)


def add_arch_args(parser):
  """--preset, --tiny and per-field overrides shared by the scripts."""
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--tiny", action="store_true",
                      help="tiny towers (seconds; for tests)")
  parser.add_argument("--batch", type=int, help="override the preset's batch")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"])
  parser.add_argument("--act", choices=["gelu", "quick_gelu", "gelu_new"])
  parser.add_argument("--text_len", type=int)
  parser.add_argument("--vocab", type=int)
  parser.add_argument("--scan", type=int, choices=[0, 1],
                      help="hica-jax layer scan (config.model.scan)")


def arch_from_args(args, **extra):
  return preset(args.preset, args.tiny, batch=args.batch, dtype=args.dtype,
                act=args.act, text_len=args.text_len, vocab=args.vocab,
                scan=None if args.scan is None else bool(args.scan), **extra)


# ----------------------------------------------------------------------------
# Machine and timing helpers.


def line_buffered_stdout():
  """Print lines as they come, also into a file (long runs, `> log &`)."""
  reconfigure = getattr(sys.stdout, "reconfigure", None)
  if reconfigure is not None:
    reconfigure(line_buffering=True)


def load_average():
  """'1.23 1.10 0.95' (1, 5, 15 min) or '?' where /proc is missing."""
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "?"


def machine():
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return (f"{os.cpu_count()} CPU cores ({cores()} usable), jax {jax.__version__} on "
          f"{len(jax.devices())} {dev.platform} device(s) ({dev.device_kind})")


def timed(fn):
  """Seconds of one call of fn() (fn must block until its work is done)."""
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def alternate(fns, rounds, warmup=1):
  """Times {name: fn} in alternating rounds.

  Every round runs each fn once in turn, so a change of machine load hits
  all of them alike; `warmup` rounds first are not recorded. Returns
  ({name: [wall seconds per round]}, {name: [process CPU seconds per round]}):
  CPU seconds (all threads) are what a step costs whatever the load, as long
  as no thread spins while it waits (true with one thread per process).
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      c = time.process_time()
      wall[name].append(timed(fn))
      cpu[name].append(time.process_time() - c)
  return wall, cpu


def cores():
  """CPU cores this process may run on (taskset / cgroup affinity)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count()


def report(results, arch, json_out="", **extra):
  """The scripts' return value {arch, machine, results, **extra}; also
  written to `json_out` when given."""
  import json  # pylint: disable=g-import-not-at-top
  out = {"arch": dataclasses.asdict(arch), "machine": machine(), **extra,
         "results": results}
  if json_out:
    with open(json_out, "w") as f:
      json.dump(out, f, indent=1)
  return out


def summary(ts):
  """{median, min, max} of a list of seconds."""
  return {"median": statistics.median(ts), "min": min(ts), "max": max(ts),
          "n": len(ts)}


def paired_ratio(num, den):
  """Median over rounds of num[i] / den[i] (robust to load drifting)."""
  return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------
# FLOPs.


def tower_forward_flops(seq, width, depth, mlp):
  """Matmul FLOPs of `depth` transformer blocks on one sequence of `seq` tokens:
  q, k, v, out (8 T W^2), MLP (4 T W M), scores and mixing (4 T^2 W)."""
  return depth * (8 * seq * width ** 2 + 4 * seq * width * mlp
                  + 4 * seq ** 2 * width)


def train_step_flops(a: Arch):
  """Analytic matmul FLOPs of one train step (forward + backward).

  Backward is twice the forward for every matmul, except the patch
  embedding, whose input (the pixels) needs no gradient (1x). Attention is
  counted dense (T x T), as both implementations compute it. Elementwise
  work, the embedding gather/scatter and the optimiser are not counted.
  """
  b, n = a.batch, a.patches
  patch_fwd = 2 * n * a.patch ** 2 * 3 * a.width
  image_fwd = tower_forward_flops(n + 1, a.width, a.depth, a.mlp)
  text_fwd = tower_forward_flops(a.text_len, a.text_width, a.text_depth,
                                 a.text_mlp)
  proj_fwd = 2 * a.embed_dim * (a.width + a.text_width)
  per_example = 3 * (image_fwd + text_fwd + proj_fwd) + 2 * patch_fwd
  logits = 3 * 2 * b * b * a.embed_dim
  return {"total": b * per_example + logits,
          "image_tower": b * (3 * image_fwd + 2 * patch_fwd),
          "text_tower": b * 3 * text_fwd,
          "projections_and_logits": b * 3 * proj_fwd + logits}


def xla_flops(compiled):
  """FLOPs XLA's cost analysis assigns to a compiled program (or None)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def jax_matmul_peak(dtype="float32", sizes=(1024, 2048), repeats=7, shapes=()):
  """Dense matmul FLOP/s of jitted jnp.dot per size, median of `repeats`.

  Returns {"<m>x<k>x<n>": flop/s}; `sizes` are square, `shapes` extra
  (m, k, n) triples (e.g. the model's own matmuls).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out = {}
  dot = jax.jit(jnp.dot)
  for m, k, n in [(s, s, s) for s in sizes] + list(shapes):
    x = jnp.ones((m, k), dtype) * 0.5
    y = jnp.ones((k, n), dtype) * 0.5
    dot(x, y).block_until_ready()
    ts = [timed(lambda: dot(x, y).block_until_ready()) for _ in range(repeats)]
    out[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(ts)
  return out


def torch_matmul_peak(dtype="float32", sizes=(1024, 2048), repeats=7,
                      device="cpu"):
  """As jax_matmul_peak, with torch.matmul (CPU: the torch thread count)."""
  import torch  # pylint: disable=g-import-not-at-top
  tdtype = getattr(torch, dtype)
  out = {}
  for s in sizes:
    x = torch.full((s, s), 0.5, dtype=tdtype, device=device)
    y = torch.full((s, s), 0.5, dtype=tdtype, device=device)

    def run():
      x @ y
      if device != "cpu":
        torch.cuda.synchronize()

    run()
    ts = [timed(run) for _ in range(repeats)]
    out[f"{s}x{s}x{s}"] = 2 * s ** 3 / statistics.median(ts)
  return out


# ----------------------------------------------------------------------------
# The batch.


def synthetic_batch(a: Arch, seed=0):
  """numpy images f32[B, H, W, 3], ids/mask i32[B, L] (EOS last valid token).

  Token ids are in [1, vocab - 2]; each row ends with the EOS id vocab - 1
  (HF CLIP pools the first EOS, hica-jax's 'eos' pool the last valid token:
  the same position), padded with 0 after it.
  """
  rng = np.random.default_rng(seed)
  b, length = a.batch, a.text_len
  images = rng.normal(size=(b, a.image_size, a.image_size, 3)).astype(np.float32)
  lengths = rng.integers(max(2, length // 2), length + 1, b)
  ids = rng.integers(1, a.vocab - 1, (b, length)).astype(np.int32)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = ids * mask
  ids[np.arange(b), lengths - 1] = a.vocab - 1
  return {"image": images, "text_ids": ids, "text_mask": mask}


# ----------------------------------------------------------------------------
# hica-jax.


def hica_model_config(a: Arch):
  """config.model for hica_jax.models.build_model: CLIP layout on both towers."""
  return {
      "embed_dim": a.embed_dim, "dtype": a.dtype, "remat": a.remat,
      "scan": a.scan,
      "image": dict(image_size=a.image_size, patch_size=a.patch,
                    width=a.width, depth=a.depth, heads=a.heads,
                    mlp_dim=a.mlp, pool="cls", act=a.act, ln_pre=True,
                    patch_bias=False, ln_eps=1e-5),
      "text": dict(width=a.text_width, depth=a.text_depth,
                   heads=a.text_heads, mlp_dim=a.text_mlp,
                   max_len=a.text_len, causal=True, pool="eos", act=a.act,
                   layout="pre", type_vocab_size=0, ln_eps=1e-5),
  }


def hica_config(a: Arch, lr=5e-4):
  """The config fields hica_jax.testing's stage-2 helpers read: the model
  (hica_model_config), the data sizes, stage 2's optimiser (the project's
  defaults, hica_jax/base_config.py) and a global-only loss without labels
  (plain CLIP InfoNCE)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({
      "model": hica_model_config(a),
      "data": {"image_size": a.image_size,
               "max_phrase_len": min(12, a.text_len)},
      "stage2": {
          "optim": dict(lr=lr, warmup_steps=30, weight_decay=0.05,
                        clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-8),
          "loss": dict(global_weight=1.0, local_weight=0.0, cross_weight=0.0,
                       beta=0.1, margin=0.2, local_mode="roi",
                       label_aware=False)}})


def clip_loss_fn(model, config):
  """loss_fn(params, batch) -> (loss, metrics): the stage-2 step's loss
  (stage2.stage2_outputs + losses.hica_loss) under config.stage2.loss,
  without labels or descriptors."""
  from hica_jax import losses  # pylint: disable=g-import-not-at-top
  from hica_jax.training import stage2  # pylint: disable=g-import-not-at-top
  weights = losses.loss_weights(config.stage2.loss)

  def loss_fn(params, batch):
    outputs = stage2.stage2_outputs(model, params, batch, None, 1,
                                    weights=weights)
    return losses.hica_loss(outputs, batch, weights)

  return loss_fn


def lower_stage2_step(config, model, batch, desc, num_classes):
  """stage2.make_stage2_step under `config` lowered from abstract shapes:
  params, optimiser state, `batch` and `desc` are ShapeDtypeStructs, so
  nothing is allocated or run."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hica_jax import losses  # pylint: disable=g-import-not-at-top
  from hica_jax.training import loop  # pylint: disable=g-import-not-at-top
  from hica_jax.training import stage2  # pylint: disable=g-import-not-at-top
  sds = jax.ShapeDtypeStruct
  size, length = config.data.image_size, config.model.text.max_len
  images = sds((1, size, size, 3), jnp.float32)
  ids = sds((1, length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids, ids)
  tx, _ = loop.make_optimizer(config.stage2.optim, 100,
                              config.stage2.get("freeze", ()))
  state = loop.TrainState(step=sds((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(tx.init, params))
  step = stage2.make_stage2_step(
      model, tx, losses.loss_weights(config.stage2.loss), num_classes)
  return step.lower(state, batch, desc, sds((), jnp.float32))


def lower_clip_step(a: Arch):
  """The CLIP-equivalent step (HicaRunner "clip") lowered from abstract
  shapes (nothing runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hica_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = hica_config(a)
  sds = jax.ShapeDtypeStruct
  batch = {"image": sds((a.batch, a.image_size, a.image_size, 3), jnp.float32),
           "text_ids": sds((a.batch, a.text_len), jnp.int32),
           "text_mask": sds((a.batch, a.text_len), jnp.int32)}
  return lower_stage2_step(config, build_model(config.model, a.vocab), batch,
                           None, 1)


class HicaRunner:
  """A hica-jax stage-2 train state and step (hica_jax.testing.stage2_trainer
  under hica_config), called as a closure that blocks until the step is done.

  kind "clip": the batch holds only images and texts, no descriptors: with
  the global term alone the step makes one image and one text pass, as
  CLIP's does (terms of weight 0 embed nothing: losses.text_inputs_needed).
  kind "stage2": the same step fed a full stage-2 batch
  (testing.fake_stage2_batch: phrases, ROI masks, labels, descriptors).
  The step is compiled ahead of time here; `compile_times` holds the first
  step's trace+lower and compile seconds.
  """

  def __init__(self, a: Arch, kind="clip", seed=0):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from hica_jax import sharding  # pylint: disable=g-import-not-at-top
    from hica_jax import testing  # pylint: disable=g-import-not-at-top
    from hica_jax.models import build_model  # pylint: disable=g-import-not-at-top
    self.arch, self.kind = a, kind
    self.config = hica_config(a)
    self.model = build_model(self.config.model, a.vocab)
    ids = jnp.zeros((1, a.text_len), jnp.int32)
    images = jnp.zeros((1, a.image_size, a.image_size, 3))
    params = jax.jit(self.model.init)(jax.random.PRNGKey(seed), images, ids,
                                      jnp.ones_like(ids))
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    self.mesh = sharding.make_mesh(jax.devices()[:1])
    if kind == "clip":
      num_classes, desc = 1, None
      batch = synthetic_batch(a, seed)
    elif kind == "stage2":
      num_classes = 3
      batch, desc = testing.fake_stage2_batch(self.config, a.batch,
                                              num_classes, seed)
      desc = sharding.replicate(desc, self.mesh)
    else:
      raise ValueError(f"kind={kind!r}: expected 'clip' or 'stage2'")
    self.state, self.step_fn, _ = testing.stage2_trainer(
        self.config, self.model, params, self.mesh, num_steps=100,
        num_classes=num_classes)
    self.loss_fn = clip_loss_fn(self.model, self.config)
    self.args = (sharding.shard_batch(batch, self.mesh), desc)
    self.lr = np.float32(5e-4)
    self.metrics = None
    self.compiled, self.compile_times = self.compile()

  def lower(self):
    return self.step_fn.lower(self.state, *self.args, self.lr)

  def compile(self):
    """AOT-compiles the step and runs the compiled executable from now on.

    Returns (compiled, {"trace_lower_s", "compile_s"}): the first step's
    compilation, apart from running it.
    """
    t = time.perf_counter()
    lowered = self.lower()
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t
    self.step_fn = compiled
    return compiled, {"trace_lower_s": t_lower, "compile_s": t_compile}

  def __call__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.state, self.metrics = self.step_fn(self.state, *self.args, self.lr)
    jax.block_until_ready((self.state, self.metrics))

  def loss(self):
    return float(self.metrics["loss"])


# ----------------------------------------------------------------------------
# transformers' PyTorch CLIPModel.


def clip_config(a: Arch):
  """transformers.CLIPConfig equal to hica_model_config(a)."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  text = dict(vocab_size=a.vocab, hidden_size=a.text_width,
              intermediate_size=a.text_mlp, num_hidden_layers=a.text_depth,
              num_attention_heads=a.text_heads,
              max_position_embeddings=a.text_len, hidden_act=a.act,
              layer_norm_eps=1e-5, projection_dim=a.embed_dim,
              attention_dropout=0.0, dropout=0.0, pad_token_id=0,
              bos_token_id=a.vocab - 2, eos_token_id=a.vocab - 1)
  vision = dict(hidden_size=a.width, intermediate_size=a.mlp,
                num_hidden_layers=a.depth, num_attention_heads=a.heads,
                image_size=a.image_size, patch_size=a.patch, num_channels=3,
                hidden_act=a.act, layer_norm_eps=1e-5,
                projection_dim=a.embed_dim, attention_dropout=0.0,
                dropout=0.0)
  return CLIPConfig(text_config=text, vision_config=vision,
                    projection_dim=a.embed_dim)


class TorchRunner:
  """CLIPModel(return_loss=True) + clip_grad_norm_ + AdamW, one step per call.

  compile=True wraps the model in torch.compile (inductor); the optimiser
  step stays eager (foreach AdamW, the default).
  """

  def __init__(self, a: Arch, compile=False, seed=0, device="cpu"):  # pylint: disable=redefined-builtin
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import CLIPModel  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    self.arch, self.device = a, device
    model = CLIPModel(clip_config(a)).to(device).train()
    self.num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    self.params = list(model.parameters())
    self.opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-8)
    self.model = torch.compile(model) if compile else model
    batch = synthetic_batch(a, seed)
    self.pixels = torch.from_numpy(
        batch["image"].transpose(0, 3, 1, 2).copy()).to(device)
    self.ids = torch.from_numpy(batch["text_ids"].astype(np.int64)).to(device)
    self.mask = torch.from_numpy(batch["text_mask"].astype(np.int64)).to(device)
    self.autocast = a.dtype == "bfloat16"
    self.last_loss = None

  def __call__(self):
    import torch  # pylint: disable=g-import-not-at-top
    dev = "cuda" if self.device != "cpu" else "cpu"
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
      out = self.model(input_ids=self.ids, attention_mask=self.mask,
                       pixel_values=self.pixels, return_loss=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.last_loss = out.loss.detach()
    if self.device != "cpu":
      torch.cuda.synchronize()

  def loss(self):
    return float(self.last_loss)


def set_torch_threads(n=None):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(n or cores())
  return torch.get_num_threads()
