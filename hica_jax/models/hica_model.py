"""HiCA dual encoder: ViT image tower + text tower + linear projections + logit scale.

Config (`config.model`, ml_collections ConfigDict or dict; every field optional):
  embed_dim: projection size d (512).
  dtype: 'float32' | 'bfloat16' compute dtype; params always stay float32.
  remat: bool, rematerialise each transformer block.  scan: bool, nn.scan over blocks.
  dropout: float (0.0), applied only with train=True.
  image: arch ('vit' (default) | 'resnet': models/resnet.py, from scratch only;
    it reads image_size, patch_size, width, depth (blocks per stage), pool
    ('gap'|'map'), act, heads, mlp_dim, map_mlp_dim, ln_eps, dtype, remat
    and ignores the ViT-only fields), then for the ViT:
    variant ('B/16', sizes Ti/S/M/B/L/H, any patch) or explicit
    image_size (224), patch_size, width, depth, heads, mlp_dim, pool ('cls'|'gap'),
    act ('quick_gelu'|'gelu'|...), ln_pre (True), patch_bias (False), ln_eps (1e-5).
    Explicit fields override the variant's.
  text: variant ('clip' | 'bert-base' | 'minilm-l6') or explicit width, depth, heads,
    mlp_dim, max_len, causal, pool ('cls'|'mean'|'eos'), act, layout ('pre'|'post'),
    type_vocab_size, ln_eps, position_offset, vocab_size (set by HF import; the
    checkpoint's vocabulary wins over the tokenizer size passed to build_model).
  image_proj / text_proj: the projection heads, dict(kind='linear' (default) | 'mlp',
    bias=False, hidden=None (mlp width), hidden_bias=True, act='gelu'); 'linear'
    keeps the param layout {kernel[, bias]}, 'mlp' has fc1, fc2 (open_clip heads).
  logit_bias_init: the sigmoid loss's learnt bias b (-10, SigLIP's init).
  Defaults when no variant is given: image 'B/16' CLIP-style, text 'clip'.
  image.dtype/remat/scan/dropout and text.* of the same name override the model-level ones.
"""
import math
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hica_jax.models.resnet import ResNet
from hica_jax.models.text import TEXT_VARIANTS, TextTransformer
from hica_jax.models.vit import ViT, activation, parse_variant

IMAGE_FIELDS = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "pool",
                "act", "ln_pre", "patch_bias", "ln_eps", "dropout", "dtype", "remat", "scan",
                "stem", "class_token", "ln_after_pool", "map_mlp_dim", "arch",
                "stage_depths")
TEXT_FIELDS = ("width", "depth", "heads", "mlp_dim", "max_len", "causal", "pool", "act",
               "layout", "type_vocab_size", "ln_eps", "position_offset", "dropout",
               "dtype", "remat", "scan", "vocab_size", "mask_padding", "pool_dense")
SHARED_FIELDS = ("dtype", "remat", "scan", "dropout")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def as_dict(cfg) -> dict:
  """ConfigDict / FrozenConfigDict / Mapping / None -> plain (nested) dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in dict(cfg).items()}


def _tower_fields(model_cfg: dict, tower: str, allowed, variant_fn) -> dict:
  sub = dict(as_dict(model_cfg.get(tower)))
  fields = {}
  variant = sub.pop("variant", None)
  if variant:
    fields.update(variant_fn(variant))
  unknown = sorted(set(sub) - set(allowed))
  if unknown:
    raise ValueError(f"config.model.{tower} has unknown field(s) {unknown}; "
                     f"allowed: variant, {', '.join(allowed)}")
  for k in SHARED_FIELDS:
    if k in model_cfg and model_cfg[k] is not None:
      fields[k] = model_cfg[k]
  fields.update(sub)
  if "dtype" in fields:
    if fields["dtype"] not in DTYPES:
      raise ValueError(f"config.model dtype={fields['dtype']!r}: expected one of {sorted(DTYPES)}")
    fields["dtype"] = DTYPES[fields["dtype"]]
  return fields


def _text_variant(name):
  if name not in TEXT_VARIANTS:
    raise ValueError(f"text.variant={name!r}: expected one of {sorted(TEXT_VARIANTS)}")
  return dict(TEXT_VARIANTS[name])


def image_tower_kwargs(model_config) -> dict:
  cfg = as_dict(model_config)
  fields = {} if as_dict(cfg.get("image")).get("variant") else parse_variant("B/16")
  fields.update(_tower_fields(cfg, "image", IMAGE_FIELDS, parse_variant))
  return fields


IMAGE_ARCHS = ("vit", "resnet")
# The ViT fields the resnet tower has no use for (it has no patch embedding,
# class token, pre-LN or scanned blocks).
VIT_ONLY_FIELDS = ("stem", "class_token", "ln_pre", "patch_bias", "ln_after_pool",
                   "scan", "dropout")
# ...and the resnet fields the ViT has no use for (None: unset).
RESNET_ONLY_FIELDS = ("stage_depths",)


def image_tower(fields: dict):
  """image_tower_kwargs(...) -> the image tower module (ViT or ResNet)."""
  fields = dict(fields)
  arch = fields.pop("arch", "vit")
  if arch == "vit":
    return ViT(**{k: v for k, v in fields.items()
                  if k not in RESNET_ONLY_FIELDS})
  if arch == "resnet":
    return ResNet(**{k: v for k, v in fields.items() if k not in VIT_ONLY_FIELDS})
  raise ValueError(f"config.model.image.arch={arch!r}: expected one of {IMAGE_ARCHS}")


def text_tower_kwargs(model_config, vocab_size: int) -> dict:
  cfg = as_dict(model_config)
  fields = {} if as_dict(cfg.get("text")).get("variant") else _text_variant("clip")
  fields.update(_tower_fields(cfg, "text", TEXT_FIELDS, _text_variant))
  ckpt_vocab = fields.pop("vocab_size", None)
  if ckpt_vocab is not None and vocab_size is not None and vocab_size > ckpt_vocab:
    raise ValueError(f"tokenizer has {vocab_size} tokens but config.model.text.vocab_size "
                     f"is {ckpt_vocab} (from the checkpoint): use the checkpoint's tokenizer.")
  fields["vocab_size"] = ckpt_vocab if ckpt_vocab is not None else vocab_size
  if fields["vocab_size"] is None:
    raise ValueError("vocab_size is required (pass the tokenizer's vocab size)")
  return fields


PROJ_FIELDS = ("kind", "bias", "hidden", "hidden_bias", "act")


class ProjectionMLP(nn.Module):
  """fc1 -> act -> fc2 (open_clip's 'mlp' heads: timm Mlp, HF text proj)."""
  features: int
  hidden: int
  bias: bool = False
  hidden_bias: bool = True
  act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [..., W] -> [..., features]."""
    x = nn.Dense(self.hidden, use_bias=self.hidden_bias, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(self.features, use_bias=self.bias, dtype=self.dtype, name="fc2")(
        activation(self.act)(x))


def projection(spec, embed_dim: int, dtype, name: str):
  """config.model.{image,text}_proj dict -> the projection module (see module docstring)."""
  spec = dict(spec or ())
  unknown = sorted(set(spec) - set(PROJ_FIELDS))
  if unknown:
    raise ValueError(f"config.model.{name} has unknown field(s) {unknown}; "
                     f"allowed: {', '.join(PROJ_FIELDS)}")
  kind = spec.get("kind", "linear")
  if kind == "linear":
    return nn.Dense(embed_dim, use_bias=bool(spec.get("bias", False)), dtype=dtype, name=name)
  if kind == "mlp":
    if not spec.get("hidden"):
      raise ValueError(f"config.model.{name}: kind 'mlp' needs `hidden` (the MLP width)")
    return ProjectionMLP(embed_dim, int(spec["hidden"]), bias=bool(spec.get("bias", False)),
                         hidden_bias=bool(spec.get("hidden_bias", True)),
                         act=spec.get("act", "gelu"), dtype=dtype, name=name)
  raise ValueError(f"config.model.{name}.kind={kind!r}: expected 'linear' or 'mlp'")


class HiCAModel(nn.Module):
  """Dual encoder. Params: image, text, image_proj, text_proj, logit_scale, logit_bias."""
  image: Any  # ViT or ResNet: images -> dict(pooled, tokens, hidden)
  text: TextTransformer
  embed_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)
  logit_scale_max: float = 100.0
  logit_bias_init: float = -10.0
  image_proj_spec: Any = None
  text_proj_spec: Any = None

  def setup(self):
    self.image_proj = projection(self.image_proj_spec, self.embed_dim, self.image.dtype,
                                 "image_proj")
    self.text_proj = projection(self.text_proj_spec, self.embed_dim, self.text.dtype,
                                "text_proj")
    self.logit_scale = self.param("logit_scale",
                                  nn.initializers.constant(self.logit_scale_init), ())
    # The sigmoid global loss's bias (losses.global_sigmoid_loss); unused by softmax.
    self.logit_bias = self.param("logit_bias",
                                 nn.initializers.constant(self.logit_bias_init), ())

  def image_features(self, images, train: bool = False):
    """images f32[B, H, W, 3] -> f32[B, width]: pooled tower output before projection."""
    return self.image(images, train=train)["pooled"].astype(jnp.float32)

  def encode_image(self, images, train: bool = False):
    """images f32[B, H, W, 3] -> (image_emb f32[B, d], patch_emb f32[B, N, d])."""
    out = self.image(images, train=train)
    g = self.image_proj(out["pooled"]).astype(jnp.float32)
    p = self.image_proj(out["tokens"]).astype(jnp.float32)
    chex.assert_shape(p, (images.shape[0], None, self.embed_dim))
    return g, p

  def encode_text(self, ids, mask, train: bool = False, token_type_ids=None):
    """ids, mask i32[B, L] -> (text_emb f32[B, d], token_emb f32[B, L, d])."""
    out = self.text(ids, mask, token_type_ids=token_type_ids, train=train)
    u = self.text_proj(out["pooled"]).astype(jnp.float32)
    w = self.text_proj(out["tokens"]).astype(jnp.float32)
    chex.assert_shape(w, (*ids.shape, self.embed_dim))
    return u, w

  def mlm_logits(self, ids, mask, train: bool = False):
    """ids, mask i32[B, L] -> f32[B, L, V] (head tied to the token embedding)."""
    return self.text(ids, mask, train=train, mlm=True)["mlm_logits"]

  def get_logit_scale(self):
    """s = min(exp(t), logit_scale_max), f32[]."""
    return jnp.minimum(jnp.exp(self.logit_scale), self.logit_scale_max)

  def get_logit_bias(self):
    """b of the sigmoid loss, f32[]."""
    return self.logit_bias.astype(jnp.float32)

  def __call__(self, images, ids, mask, train: bool = False):
    """Touches every parameter (for init): returns (image_emb, text_emb, mlm_logits, scale)."""
    g, _ = self.encode_image(images, train=train)
    u, _ = self.encode_text(ids, mask, train=train)
    return g, u, self.mlm_logits(ids, mask, train=train), self.get_logit_scale()


def build_model(model_config, vocab_size: int) -> HiCAModel:
  """config.model (see module docstring) + tokenizer vocab size -> HiCAModel."""
  cfg = as_dict(model_config)
  extra = {k: cfg[k] for k in ("logit_scale_init", "logit_scale_max", "logit_bias_init")
           if cfg.get(k) is not None}
  return HiCAModel(image=image_tower(image_tower_kwargs(cfg)),
                   text=TextTransformer(**text_tower_kwargs(cfg, vocab_size)),
                   embed_dim=int(cfg.get("embed_dim", 512)),
                   image_proj_spec=_frozen(cfg.get("image_proj")),
                   text_proj_spec=_frozen(cfg.get("text_proj")), **extra)


def fold_feature_norm(params, mean, std=None):
  """params with the image tower's ln_post scale and bias set so that its
  features (pooled, tokens) come out as (x - mean) / std per feature.

  mean, std f[w]: statistics of the pooled features over some images (std
  None: centre only). Exact for every pool that ends in ln_post (ViT 'cls',
  'gap', ln_after_pool; ResNet 'gap'): the pool is a per-feature affine map
  of ln_post's output, or ln_post itself. Returns a new tree; `params` is
  unchanged.
  """
  ln = params["params"]["image"]["ln_post"]
  chex.assert_equal_shape([ln["scale"], mean])
  std = jnp.ones_like(mean) if std is None else std
  chex.assert_equal_shape([mean, std])
  folded = {"scale": ln["scale"] / std, "bias": (ln["bias"] - mean) / std}
  image = dict(params["params"]["image"], ln_post=folded)
  return dict(params, params=dict(params["params"], image=image))


def with_logit_scale(params, scale):
  """params whose logit scale s is `scale` (param logit_scale = log s, f32[]).

  Returns a new tree; `params` is unchanged. A scale above the model's
  logit_scale_max is clipped to it where the model reads it.
  """
  if not scale > 0:
    raise ValueError(f"logit scale {scale}: give a positive value")
  old = params["params"]["logit_scale"]
  chex.assert_shape(old, ())
  t = jnp.asarray(math.log(scale), old.dtype)
  return dict(params, params=dict(params["params"], logit_scale=t))


def principal_directions(feats, dim):
  """f[w, dim]: the top `dim` principal directions (unit columns, by
  decreasing variance) of feats f[N, w] about their mean, each signed so
  that its largest entry is positive (an SVD's signs are arbitrary)."""
  feats = np.asarray(feats, np.float64)
  if dim > feats.shape[1]:
    raise ValueError(f"{dim} principal directions of {feats.shape[1]} "
                     "features: embed_dim must not exceed the image "
                     "tower's width for eval.hica_proj_init='pool_pca'")
  _, _, vt = np.linalg.svd(feats - feats.mean(0), full_matrices=False)
  dirs = vt[:dim].T
  signs = np.sign(dirs[np.abs(dirs).argmax(0), np.arange(dim)])
  return (dirs * signs).astype(np.float32)


def _frozen(spec):
  """A projection dict as a hashable module field (sorted items), None if empty."""
  return tuple(sorted(as_dict(spec).items())) or None
