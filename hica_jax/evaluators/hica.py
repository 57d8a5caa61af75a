"""HiCA few-shot: stage 2 on the K-shot support set from the stage-1 model,
then the prototype classifier. Its variants zero some loss weights:
global_only (CLIP-style contrastive fine-tuning) and the ablations; the
no_stage1 ablation starts from the random initialisation instead.
Every run that starts from stage 1's image tower also holds the params
that eval.hica_freeze names (on top of stage2.freeze), normalises that
tower's features by the train pool's statistics (eval.hica_feature_norm),
starts image_proj where eval.hica_proj_init says and, where
eval.hica_logit_scale is positive, holds the logit scale at that value.
"""
import ml_collections

from hica_jax.models import hica_model
from hica_jax.training import stage2

# The param that eval.hica_logit_scale holds.
LOGIT_SCALE_RULE = "^params/logit_scale$"

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


def train(env, init, loss_config, k, seed, tables=None, name="hica",
          from_stage1=True):
  """Params after stage 2 with `loss_config` on the (K, seed) support set.

  from_stage1: whether `init`'s image tower is stage 1's; only then are
  eval.hica_freeze's params held (holding a random tower fixes it at
  noise, which no one would run), its features normalised and the logit
  scale held at eval.hica_logit_scale (when positive).
  """
  extra = tuple(env.config.eval.get("hica_freeze", ())) if from_stage1 else ()
  if from_stage1:
    norm = env.config.eval.get("hica_feature_norm")
    init = env.with_proj_init(env.with_feature_norm(init, norm),
                              env.config.eval.get("hica_proj_init"), norm)
    scale = env.config.eval.get("hica_logit_scale") or 0.0
    if scale > 0:
      init = hica_model.with_logit_scale(init, scale)
      extra += (LOGIT_SCALE_RULE,)
  result = stage2.train_on(env.ctx, init, env.support_indices(k, seed),
                           env.steps(k), seed, tables=tables,
                           loss_config=loss_config, extra_freeze=extra,
                           desc=f"{name} K={k} seed={seed}")
  return result.state.params


def train_variant(env, variant, k, seed, tables=None):
  """Params of the ZEROED `variant` after stage 2 on the support set."""
  from_stage1 = variant != "no_stage1"
  init = env.stage1 if from_stage1 else env.random_init
  return train(env, init, variant_loss(env.config.stage2.loss, variant), k,
               seed, tables, variant, from_stage1)


def cell(env, k, seed, variant="hica"):
  return env.evaluate_prototypes(train_variant(env, variant, k, seed))
