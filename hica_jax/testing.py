"""What tests and bench scripts share: the configs by name, a tiny model with
params, a fake stage-2 batch, a ready stage-2 trainer (state and step), the
evaluation env of a finished stage 1, and JSON-line output."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hica_jax import base_config
from hica_jax import losses
from hica_jax import sharding
from hica_jax.models import build_model
from hica_jax.training import loop
from hica_jax.training import stage2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Token ids of the fake batches lie in [5, VOCAB).
VOCAB = 40


def config(family="busi", arg="tiny"):
  """configs/<family>_fewshot.py's get_config(arg) (family: chestxray, busi)."""
  path = os.path.join(REPO, "configs", f"{family}_fewshot.py")
  spec = importlib.util.spec_from_file_location(f"{family}_fewshot", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def apply_overrides(config, overrides):
  """The in-process twin of `--config.a.b=v` flags: {dotted field: value}.
  A key "+a.b" adds the field b, which the config must not have, to a:
  for a bench that tries a model option the configs do not expose (e.g.
  "+model.image_proj": {"kind": "linear", "bias": True})."""
  for key, value in overrides.items():
    if key.startswith("+"):
      parent, _, leaf = key[1:].rpartition(".")
      node = config
      if parent:
        holder, name = base_config.field_parent(config, parent)
        node = holder[name] if holder is not None else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf in node:
        raise KeyError(f"{key}: the config has {key[1:]} already, or no "
                       f"{parent or 'root'} to add it to")
      node[leaf] = (ml_collections.ConfigDict(value) if isinstance(value, dict)
                    else value)
      continue
    node, leaf = base_config.field_parent(config, key)
    if node is None:
      raise KeyError(f"{key}: the config has no such field")
    node[leaf] = value
  return config


def with_added_params(ctx, params):
  """params with every leaf that ctx's model has and `params` lacks (an
  option added by a "+" override) at its initialisation."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  init = traverse_util.flatten_dict(context_lib.init_params(
      ctx, jax.random.PRNGKey(ctx.config.seed)))
  have = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: have.get(k, v)
                                       for k, v in init.items()})


def real_context(family, config_arg, data_root, workdir, overrides=None):
  """The context of configs/<family>_fewshot.py:<config_arg> with
  data.root=data_root (the real-image defaults resolved) and `overrides`
  ({dotted field: value}) over `workdir`."""
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  cfg = config(family, config_arg)
  cfg.data.root = data_root
  # The overrides stand for the command line: they keep their fields (and
  # naming model.image.arch keeps the tower's real defaults) off.
  base_config.resolve_real_defaults(
      cfg, explicit={k.lstrip("+") for k in overrides or {}})
  apply_overrides(cfg, overrides or {})
  return context_lib.build_context(cfg, workdir)


def stage1_env(family, config_arg, data_root, workdir, overrides=None):
  """(ctx, EvalEnv) over the finished stage 1 of `workdir`, ctx as
  real_context gives it. Params that "+" overrides add to the model (a
  projection's bias) start at their initialisation (with_added_params)."""
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top
  ctx = real_context(family, config_arg, data_root, workdir, overrides)
  stage1 = context_lib.load_final_params(ctx, "stage1")
  if stage1 is None:
    raise SystemExit(f"{workdir}: no finished stage 1; run the README "
                     "command with this data root and --workdir first.")
  if any(k.startswith("+") for k in overrides or {}):
    stage1 = with_added_params(ctx, stage1)
  return ctx, env_lib.EvalEnv(ctx, stage1)


def stage1_env_with_text_tower(family, config_arg, text_arg, data_root,
                               workdir, overrides=None):
  """(ctx, EvalEnv) like stage1_env's, whose stage-1 params take the image
  tower from the finished stage 1 of `workdir` and the rest (the text tower
  and its tokenizer, the projections) from the initialisation of config
  arg `text_arg` (e.g. minilm: the pretrained all-MiniLM-L6-v2)."""
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top
  _, stage1 = stage1_env(family, config_arg, data_root, workdir, overrides)
  ctx = real_context(family, ",".join(a for a in (config_arg, text_arg) if a),
                     data_root, workdir, overrides)
  params = context_lib.init_params(ctx, jax.random.PRNGKey(ctx.config.seed))
  params["params"]["image"] = stage1.stage1["params"]["image"]
  return ctx, env_lib.EvalEnv(ctx, params)


def add_stage1_run_args(parser, shots=(16,), data_root_required=True):
  """The argparse flags of a bench that reads the finished stage 1 of a run
  (stage1_env): --family, --config_arg, --data_root, --workdir, --shots
  (comma-separated K, default `shots`) and --seeds."""
  parser.add_argument("--family", default="chestxray",
                      help="configs/<family>_fewshot.py")
  parser.add_argument("--config_arg", default="",
                      help="config args of the stage-1 run, e.g. tiny")
  parser.add_argument("--data_root", required=data_root_required,
                      default="", help="the real folder of the stage-1 run"
                      + ("" if data_root_required else "; \"\" synthetic"))
  parser.add_argument("--workdir", required=True,
                      help="the stage-1 run's workdir")
  parser.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")],
                      default=list(shots))
  parser.add_argument("--seeds", type=int, default=5)


def emit_json_line(path, row):
  """Prints `row` as one JSON line and appends it to the file `path`."""
  line = json.dumps(row)
  print(line, flush=True)
  with open(path, "a") as f:
    f.write(line + "\n")


def write_report(out, stem, data, text):
  """<out>/<stem>.json (data) and <out>/<stem>.md (text), and prints text:
  the bench summaries' two forms, one for programs and one for people."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(data, f, indent=2)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(text)
  print(text)


def tiny_model(family="busi", image=None):
  """(config, model, params on the host) of the `tiny` config, vocab VOCAB;
  `image`: config.model.image fields to override (e.g. arch)."""
  cfg = config(family, "tiny")
  cfg.model.image.update(dict(image or {}))
  model = build_model(cfg.model, VOCAB)
  size, max_len = cfg.data.image_size, cfg.model.text.max_len
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                      jnp.zeros((1, max_len), jnp.int32),
                      jnp.ones((1, max_len), jnp.int32))
  return cfg, model, jax.device_get(params)


def fake_stage2_batch(cfg, b=16, num_classes=3, seed=0):
  """(batch, desc) in the pipeline's stage-2 layout: random images, texts,
  phrases and ROIs (one box per non-normal example), two descriptors per
  class."""
  rng = np.random.default_rng(seed)
  size, max_len = cfg.data.image_size, cfg.model.text.max_len
  lp = cfg.data.max_phrase_len

  def ids(n, length):
    x = rng.integers(5, VOCAB, (n, length)).astype(np.int32)
    m = (np.arange(length)[None] < rng.integers(3, length, (n, 1)))
    return x * m, m.astype(np.int32)

  text_ids, text_mask = ids(b, max_len)
  phrase_ids, phrase_mask = ids(b, lp)
  label = rng.integers(0, num_classes, b).astype(np.int32)
  roi = np.zeros((b, size, size), np.float32)
  for i in range(b):
    y, x = rng.integers(0, size - 10, 2)
    roi[i, y:y + 9, x:x + 11] = label[i] > 0
  batch = {
      "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
      "roi_mask": roi, "has_roi": (label > 0).astype(np.float32),
      "label": label, "text_ids": text_ids, "text_mask": text_mask,
      "phrase_ids": phrase_ids, "phrase_mask": phrase_mask,
      "phrase_id": np.where(label > 0, label - 1, -1).astype(np.int32),
      "index": np.arange(b, dtype=np.int32),
  }
  d_ids, d_mask = ids(2 * num_classes, max_len)
  desc = {"ids": d_ids, "mask": d_mask,
          "category": np.repeat(np.arange(num_classes), 2).astype(np.int32)}
  return batch, desc


def stage2_trainer(cfg, model, params, mesh, *, num_steps=10, weights=None,
                   accum_steps=1, param_shardings=None, num_classes=3):
  """(state, step, schedule): a fresh stage-2 state on `mesh` and its jitted
  step with the output state pinned to the input's layout.

  weights default to losses.loss_weights(cfg.stage2.loss).
  """
  tx, schedule = loop.make_optimizer(cfg.stage2.optim, num_steps,
                                     **loop.freeze_args(cfg.stage2))
  state = loop.create_state(params, tx, mesh, param_shardings=param_shardings)
  step = stage2.make_stage2_step(
      model, tx, weights or losses.loss_weights(cfg.stage2.loss), num_classes,
      accum_steps=accum_steps, mesh=mesh,
      state_sharding=loop.state_shardings(state),
      held=loop.held_patterns(cfg.stage2))
  return state, step, schedule


def run_stage2_steps(step, state, batch, desc, mesh, steps=2, lr=1e-3):
  """Runs `steps` steps on one batch; returns (losses, params on host)."""
  out = []
  for _ in range(steps):
    state, metrics = step(state, sharding.shard_batch(batch, mesh),
                          sharding.replicate(desc, mesh), np.float32(lr))
    out.append(float(metrics["loss"]))
  return out, jax.device_get(state.params), state
