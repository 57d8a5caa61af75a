"""HiCA dual encoder: ViT image tower + text tower + linear projections + logit scale.

Config (`config.model`, ml_collections ConfigDict or dict; every field optional):
  embed_dim: projection size d (512).
  dtype: 'float32' | 'bfloat16' compute dtype; params always stay float32.
  remat: bool, rematerialise each transformer block.  scan: bool, nn.scan over blocks.
  dropout: float (0.0), applied only with train=True.
  image: variant ('B/16', sizes Ti/S/M/B/L/H, any patch) or explicit
    image_size (224), patch_size, width, depth, heads, mlp_dim, pool ('cls'|'gap'),
    act ('quick_gelu'|'gelu'|...), ln_pre (True), patch_bias (False), ln_eps (1e-5).
    Explicit fields override the variant's.
  text: variant ('clip' | 'bert-base' | 'minilm-l6') or explicit width, depth, heads,
    mlp_dim, max_len, causal, pool ('cls'|'mean'|'eos'), act, layout ('pre'|'post'),
    type_vocab_size, ln_eps, position_offset, vocab_size (set by HF import; the
    checkpoint's vocabulary wins over the tokenizer size passed to build_model).
  Defaults when no variant is given: image 'B/16' CLIP-style, text 'clip'.
  image.dtype/remat/scan/dropout and text.* of the same name override the model-level ones.
"""
import math
from typing import Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp

from hica_jax.models.text import TEXT_VARIANTS, TextTransformer
from hica_jax.models.vit import ViT, parse_variant

IMAGE_FIELDS = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "pool",
                "act", "ln_pre", "patch_bias", "ln_eps", "dropout", "dtype", "remat", "scan",
                "stem")
TEXT_FIELDS = ("width", "depth", "heads", "mlp_dim", "max_len", "causal", "pool", "act",
               "layout", "type_vocab_size", "ln_eps", "position_offset", "dropout",
               "dtype", "remat", "scan", "vocab_size")
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


class HiCAModel(nn.Module):
  """Dual encoder. Params: image, text, image_proj, text_proj, logit_scale."""
  image: ViT
  text: TextTransformer
  embed_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)
  logit_scale_max: float = 100.0

  def setup(self):
    dtype = self.image.dtype
    self.image_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=dtype)
    self.text_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.text.dtype)
    self.logit_scale = self.param("logit_scale",
                                  nn.initializers.constant(self.logit_scale_init), ())

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

  def __call__(self, images, ids, mask, train: bool = False):
    """Touches every parameter (for init): returns (image_emb, text_emb, mlm_logits, scale)."""
    g, _ = self.encode_image(images, train=train)
    u, _ = self.encode_text(ids, mask, train=train)
    return g, u, self.mlm_logits(ids, mask, train=train), self.get_logit_scale()


def build_model(model_config, vocab_size: int) -> HiCAModel:
  """config.model (see module docstring) + tokenizer vocab size -> HiCAModel."""
  cfg = as_dict(model_config)
  extra = {k: cfg[k] for k in ("logit_scale_init", "logit_scale_max") if k in cfg}
  return HiCAModel(image=ViT(**image_tower_kwargs(cfg)),
                   text=TextTransformer(**text_tower_kwargs(cfg, vocab_size)),
                   embed_dim=int(cfg.get("embed_dim", 512)), **extra)
