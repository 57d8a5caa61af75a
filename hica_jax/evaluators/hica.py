"""HiCA few-shot: stage 2 on the K-shot support set from the stage-1 model,
then the prototype classifier. Its variants zero some loss weights:
global_only (CLIP-style contrastive fine-tuning) and the ablations; the
no_stage1 ablation starts from the random initialisation instead.
"""
import ml_collections

from hica_jax.training import stage2

# Stage-2 loss weights that each contrastive variant sets to zero.
ZEROED = {"hica": (), "no_stage1": (),
          "global_only": ("local_weight", "cross_weight"),
          "no_global": ("global_weight",), "no_local": ("local_weight",),
          "no_cross": ("cross_weight",)}


def variant_loss(loss_config, variant):
  """Copy of config.stage2.loss with the variant's weights zeroed."""
  out = ml_collections.ConfigDict(loss_config.to_dict())
  for field in ZEROED[variant]:
    out[field] = 0.0
  return out


def train(env, init, loss_config, k, seed, tables=None, name="hica"):
  """Params after stage 2 with `loss_config` on the (K, seed) support set."""
  result = stage2.train_on(env.ctx, init, env.support_indices(k, seed),
                           env.steps(k), seed, tables=tables,
                           loss_config=loss_config,
                           desc=f"{name} K={k} seed={seed}")
  return result.state.params


def train_variant(env, variant, k, seed, tables=None):
  """Params of the ZEROED `variant` after stage 2 on the support set."""
  init = env.random_init if variant == "no_stage1" else env.stage1
  return train(env, init, variant_loss(env.config.stage2.loss, variant), k,
               seed, tables, variant)


def cell(env, k, seed, variant="hica"):
  return env.evaluate_prototypes(train_variant(env, variant, k, seed))
